"""Benchmarks of the crctl relay (see bench/README.md). Not part of the package."""
