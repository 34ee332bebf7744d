"""Causal grouped-query attention with cuDNN's fused flash attention
(``jax.nn.dot_product_attention(implementation="cudnn")``; NVIDIA GPUs only).

cuDNN takes K < N key/value heads directly (no repeated K/V) and never builds the score
matrix. Its public JAX API has no segment ids, so this function takes none: it is for one causal
sequence per row, and rows with packed documents or padding need another implementation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256   # 128 before Hopper (cuDNN itself refuses that case)


def cudnn_unsupported(dtype, head_dim: int) -> str | None:
    """Why cuDNN's flash attention cannot take inputs of this dtype and head dim, or None."""
    if jnp.dtype(dtype) not in [jnp.dtype(x) for x in CUDNN_DTYPES]:
        return f"cuDNN flash attention takes bfloat16 or float16 inputs, not {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most "
                f"{CUDNN_MAX_HEAD_DIM} (128 before Hopper), not {head_dim}")
    return None


def dense_attention_cudnn(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array
                          ) -> jax.Array:
    """Causal attention ``[B, T, N, D]`` of one sequence per row; query head n uses kv head
    n // G. Raises ValueError for a dtype or head dim cuDNN does not take."""
    why = cudnn_unsupported(q_btnd.dtype, q_btnd.shape[-1])
    if why:
        raise ValueError(why)
    return jax.nn.dot_product_attention(q_btnd, k_btkd.astype(q_btnd.dtype),
                                        v_btkd.astype(q_btnd.dtype), is_causal=True,
                                        implementation="cudnn")
