"""Benchmarks: ``python -m orthoreg.bench <name>``; measured figures, not timed tests."""
