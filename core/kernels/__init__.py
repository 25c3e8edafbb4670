"""Triton kernels and their pure-torch twins (filled by the kernels work)."""
