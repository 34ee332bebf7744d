"""Causal grouped-query attention with JAX's Pallas TPU splash attention kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``), in the ``[B, T, N, D]`` layout.

The kernel's multi-head form takes K < N key/value heads directly (query head n reads kv head
n // G), so K and V are never repeated. Sequences are padded to a multiple of 128 (the kernel's
tile unit); the causal mask hides the padded keys from real queries. Segment ids go to the
kernel, which lets equal ids attend; padding (segment 0) rows would then attend to each other,
so their outputs are set to 0, as in mcpm's other implementations (no gradient flows from them).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

_LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, length: int, block: int, interpret: bool):
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * num_heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def dense_attention_splash(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array,
                           segment_ids_bt: jax.Array | None = None, *,
                           interpret: bool = False, max_block: int = 512) -> jax.Array:
    """Causal attention ``[B, T, N, D]`` (query dtype) with the splash kernel; query head n uses
    kv head n // G. ``segment_ids_bt [B, T]``: packed documents, 0 = padding (never attended;
    padding rows give zeros). ``interpret``: run the kernel in the Pallas interpreter (CPU).
    Tiles are ``max_block`` (or the largest of 512, 256, 128 dividing the padded length).
    """
    b, t, n, d = q_btnd.shape
    tp = _round_up(t, _LANES)
    block = next(c for c in (512, 256, 128) if c <= max(max_block, _LANES) and tp % c == 0)
    kernel = _kernel(n, tp, block, bool(interpret))
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    # the kernel does not scale: fold 1/sqrt(D) into q (float32, then back to q's dtype)
    q = (q_btnd.astype(jnp.float32) / math.sqrt(d)).astype(q_btnd.dtype)
    q = jnp.pad(q, pad).transpose(0, 2, 1, 3)                           # [B, N, Tp, D]
    k = jnp.pad(k_btkd, pad).transpose(0, 2, 1, 3)                      # [B, K, Tp, D]
    v = jnp.pad(v_btkd, pad).transpose(0, 2, 1, 3)
    if segment_ids_bt is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
            q, k, v, seg)
    out = out.transpose(0, 2, 1, 3)[:, :t]
    if segment_ids_bt is not None:
        out = jnp.where((segment_ids_bt != 0)[:, :, None, None], out, 0)
    return out.astype(q_btnd.dtype)
