.PHONY: serve test bench bench-quick lint fuzz

serve:
	bash scripts/serve.sh

test:
	bash scripts/test.sh

# Coverage-guided fuzzing of the readers and the kernel (CKPTSCOPE_FUZZ_SECONDS per harness).
fuzz:
	bash scripts/setup.sh --test
	bash scripts/fuzz.sh

lint:
	.venv/bin/ruff check ckptscope tests scripts bench fuzz
	.venv/bin/mypy

# Generates ~13 GB of checkpoints under bench-data/ (kept between runs) and writes BENCHMARKS.md.
bench:
	bash scripts/setup.sh --test
	.venv/bin/python -m pip install --quiet weightlens==0.3.0
	.venv/bin/python -m bench.run --runs 3
	.venv/bin/python -m bench.sources --runs 3

bench-quick:
	bash scripts/setup.sh --test
	.venv/bin/python -m pip install --quiet weightlens==0.3.0
	.venv/bin/python -m bench.run --runs 1 --quick
	.venv/bin/python -m bench.sources --runs 1 --quick
