"""Benchmarks on the real stack; they print tables and never pass or fail."""
