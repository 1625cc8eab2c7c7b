"""Benchmarks: measured on loopback only, every load loop bounded in count and time."""
