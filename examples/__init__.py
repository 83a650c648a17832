"""Runnable examples and the real-data tasks they share with the tests and benchmarks (not installed)."""
