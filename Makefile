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

# Generates ~15 GB of checkpoints under bench-data/ (kept between runs) and writes BENCHMARKS.md:
# bench.run the page outside the marked sections, each other module its own <!-- NAME:begin/end -->;
# every module runs even where one before it failed, and the target fails if any did.
BENCH_MODULES = kernel_passes uploads pages startup sources

bench:
	bash scripts/setup.sh --test
	.venv/bin/python -m pip install --quiet weightlens==0.3.0
	failed=""; .venv/bin/python -m bench.run --runs 3 || failed="run"; \
	for m in $(BENCH_MODULES); do .venv/bin/python -m bench.$$m --runs 3 || failed="$$failed $$m"; done; \
	if [ -n "$$failed" ]; then echo "bench modules that failed: $$failed" >&2; exit 1; fi

bench-quick:
	bash scripts/setup.sh --test
	.venv/bin/python -m pip install --quiet weightlens==0.3.0
	failed=""; .venv/bin/python -m bench.run --runs 1 --quick || failed="run"; \
	for m in $(BENCH_MODULES); do .venv/bin/python -m bench.$$m --runs 1 --quick || failed="$$failed $$m"; done; \
	if [ -n "$$failed" ]; then echo "bench modules that failed: $$failed" >&2; exit 1; fi
