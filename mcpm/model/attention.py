"""The attention seam: every attention call in the model goes through :func:`attention` (or
:func:`cached_attention`, the same over one layer of the head-major KV cache).

Dense grouped-query attention, or InfLLM v2 (spec section 3, from ``mcpm_kernels``) when a
``sparse_config`` is set and the key length reaches ``dense_len`` (the cache-less path only, so
far: sparse decode is part of issue 3).

Mask convention (everywhere in mcpm): boolean, True = attend.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcpm.config import ModelConfig
from mcpm_kernels.infllmv2 import infllmv2_attention


def attention_mask(q_slot_bt: jax.Array, q_seg_bt: jax.Array,
                   k_slot_bs: jax.Array, k_seg_bs: jax.Array) -> jax.Array:
    """Boolean ``[B, T, S]``: causal in slot order, same segment, never a padding key (seg 0)."""
    causal = k_slot_bs[:, None, :] <= q_slot_bt[:, :, None]
    same_doc = k_seg_bs[:, None, :] == q_seg_bt[:, :, None]
    return causal & same_doc & (k_seg_bs[:, None, :] != 0)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis where ``mask``; rows with no visible key give zeros
    (padding queries) instead of NaN."""
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def dense_attention(q_btnd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array,
                    mask_bts: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D) masked) v in float32; query head n uses kv head n // G.

    Rows with no visible key (padding queries) return zeros instead of NaN.
    """
    b, t, n, d = q_btnd.shape
    kv = k_bskd.shape[2]
    q_btkgd = q_btnd.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _masked_softmax(scores, mask_bts[:, None, None, :, :]).astype(v_bskd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd)
    return out.reshape(b, t, n, d)


def dense_attention_head_major(q_btnd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                               mask_bts: jax.Array) -> jax.Array:
    """:func:`dense_attention` with keys/values in the KV cache's head-major ``[B, K, S, D]``
    layout: (b, k) are the leading batch dims of both einsums, so the keys and values are read
    in place, never transposed."""
    b, t, n, d = q_btnd.shape
    kv = k_bksd.shape[1]
    q_btkgd = q_btnd.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bksd->bktgs", q_btkgd, k_bksd,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _masked_softmax(scores, mask_bts[:, None, :, None, :]).astype(v_bksd.dtype)
    out = jnp.einsum("bktgs,bksd->btkgd", probs, v_bksd)
    return out.reshape(b, t, n, d)


def _needs_sparse(key_len: int, cfg: ModelConfig) -> bool:
    sparse = cfg.sparse_config
    return sparse is not None and (sparse.dense_len == -1 or key_len >= sparse.dense_len)


def _check_dense(key_len: int, cfg: ModelConfig) -> None:
    if _needs_sparse(key_len, cfg):
        raise NotImplementedError(
            f"InfLLM v2 decode over a KV cache is needed for {key_len} keys (sparse_config."
            f"dense_len = {cfg.sparse_config.dense_len}) but is not implemented yet (issue 3). "
            "Below dense_len the official model is dense and mcpm matches it; remove "
            "sparse_config or raise dense_len to generate with dense attention at this length.")


def attention(q_btnd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
              cfg: ModelConfig, segment_ids_bt: jax.Array | None = None,
              k_pre_rope_btkd: jax.Array | None = None) -> jax.Array:
    """Pick the attention implementation for this call (shapes are static under jit).

    With a ``sparse_config`` and at least ``dense_len`` keys this is InfLLM v2 (the gathered
    plain-JAX path), which takes the documents from ``segment_ids_bt`` instead of the mask;
    ``k_pre_rope_btkd`` are the keys it scores blocks with when ``use_nope``.
    """
    if _needs_sparse(k_bskd.shape[1], cfg):
        return infllmv2_attention(q_btnd, k_bskd, v_bskd, cfg.sparse_config,
                                  implementation="xla", segment_ids=segment_ids_bt,
                                  scoring_keys=k_pre_rope_btkd)
    return dense_attention(q_btnd, k_bskd, v_bskd, mask_bts)


def cached_attention(q_btnd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                     mask_bts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """:func:`attention` over one layer of the KV cache (head-major ``[B, K, S, D]``)."""
    _check_dense(k_bksd.shape[2], cfg)
    return dense_attention_head_major(q_btnd, k_bksd, v_bksd, mask_bts)
