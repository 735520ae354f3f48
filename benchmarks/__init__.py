"""Benchmarks: scripts (`python -m benchmarks.NAME`), each ending with one JSON line."""
