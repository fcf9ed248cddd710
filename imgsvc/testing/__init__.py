"""Helpers for the test suite and benchmarks: tiny random models built at run time, offline."""
