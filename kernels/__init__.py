"""Triton kernels, installed as ``nf4.kernels`` (the Triton backend)."""
