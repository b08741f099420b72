"""Benchmarks for hetcomm: the ``hetcomm-bench`` command lives in :mod:`hetcomm.bench.cli`."""
