"""Benchmarks that measure omnipeft against its peers in the same run and print ratios."""
