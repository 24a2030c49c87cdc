"""Benchmarks of nnfim: scripts that print cost ratios measured side by side."""
