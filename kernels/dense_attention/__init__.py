"""Memory-efficient dense causal grouped-query attention in plain JAX (the dense baseline the
InfLLM v2 benchmarks compare against); see :mod:`mcpm_kernels.dense_attention.xla`."""
from mcpm_kernels.dense_attention.xla import dense_attention_xla

__all__ = ["dense_attention_xla"]
