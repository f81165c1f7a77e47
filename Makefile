# Benchmarks: they attach eBPF, so they need root, bcc and kernel headers (as the capture
# tests do). The tests themselves: `bash scripts/bootstrap.sh test`.
PYTHON ?= .venv/bin/python

# About five minutes: 5 s capture runs.
bench:
	$(PYTHON) benchmarks/bench_capture.py

# The issue's targets as stated: 30 s capture runs.
bench-full:
	$(PYTHON) benchmarks/bench_capture.py --full

.PHONY: bench bench-full
