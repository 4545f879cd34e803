"""Coverage-guided fuzzing (atheris/libFuzzer) of the checkpoint readers and the C stats kernel.

``scripts/fuzz.sh`` builds the seed corpora (``fuzz/seeds.py``) and runs each harness for a bounded
time; ``fuzz/sanitized_kernel.py`` builds the kernel with AddressSanitizer and UBSan, for
``tests/stats/test_kernel_sanitizers.py`` and for replaying the kernel corpus under the sanitizers.
Nothing here is imported by the ckptscope package.
"""

# an input of fuzz_readers holding this is a sharded set: the index before it, the shard after it
SHARD_SEPARATOR = b"\n--ckptscope-fuzz-shard--\n"
