"""Benchmarks behind ``tools/bench.py``: they measure and print, they never pass or fail."""
