"""Benchmark helpers: synthetic model generation and benchmark drivers (not part of the installed package)."""
