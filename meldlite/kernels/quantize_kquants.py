"""Jitted K-quant quantizers (Q2_K..Q6_K)."""

KERNELS = {}
