"""Dense causal grouped-query attention kernels, none of which builds a ``[T, S]`` score array:

* :mod:`~mcpm_kernels.dense_attention.xla`: tiled online softmax in plain JAX (any backend),
  with a custom VJP; and its forward over a KV cache (prefill).
* :mod:`~mcpm_kernels.dense_attention.splash`: JAX's Pallas TPU splash attention.
* :mod:`~mcpm_kernels.dense_attention.cudnn`: cuDNN's fused attention (NVIDIA GPUs).
"""
from mcpm_kernels.dense_attention.cudnn import dense_attention_cudnn
from mcpm_kernels.dense_attention.splash import dense_attention_splash
from mcpm_kernels.dense_attention.xla import cached_dense_attention_xla, dense_attention_xla

__all__ = ["cached_dense_attention_xla", "dense_attention_cudnn", "dense_attention_splash",
           "dense_attention_xla"]
