"""Benchmarks: each prints its figures and saves them (JSON, and a plot where useful)."""
