"""Benchmarks (``make bench``): numbers go to BENCHMARKS.md."""
