"""Benchmarks behind ``main/bench.py``: they measure and print, they never pass or fail."""
