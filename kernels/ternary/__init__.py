"""Matmuls against 2-bit / base-3 packed ternary weights (BitCPM4 inference): the plain-jax path
and the Pallas TPU kernel that unpacks tiles in VMEM (matmul.py)."""
from mcpm_kernels.ternary.matmul import (pallas_supported, ternary_matmul, ternary_matmul_pallas,
                                         ternary_matmul_xla)

__all__ = ["pallas_supported", "ternary_matmul", "ternary_matmul_pallas", "ternary_matmul_xla"]
