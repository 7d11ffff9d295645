"""Benchmarks of lrd_fx against the original models and peer factorizations (`python -m bench`)."""
