"""The attention seam: every attention call in the model goes through :func:`attention` (or
:func:`cached_attention`, the same over one layer of the head-major KV cache).

Dense grouped-query attention, or InfLLM v2 (spec section 3, from ``mcpm_kernels``) when a
``sparse_config`` is set and the key length reaches ``dense_len``: over the new keys in a
cache-less call, over the KV cache and its compressed keys in a cached one (prefill, decode).
InfLLM v2's blocks and kernels count from each row's first real token, so left padding does not
change a row's outputs.

Mask convention (everywhere in mcpm): boolean, True = attend.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mcpm.config import ModelConfig
from mcpm_kernels.infllmv2 import infllmv2_attention
from mcpm_kernels.infllmv2.decode import cached_sparse_attention, leading_padding


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


def sparse_possible(cfg: ModelConfig, max_len: int) -> bool:
    """Whether a KV cache of ``max_len`` slots can ever need InfLLM v2 (then it keeps compressed
    keys): a sparse_config whose ``dense_len`` is -1 or at most ``max_len``."""
    return _needs_sparse(max_len, cfg)


def _per_row(sparse_b: jax.Array, sparse_fn, dense_fn) -> jax.Array:
    """Rows where ``sparse_b`` take ``sparse_fn()``, the others ``dense_fn()`` (both ``[B, ...]``);
    only the branch(es) needed at run time are computed."""
    def mixed():
        return jnp.where(sparse_b[:, None, None, None], sparse_fn(), dense_fn())

    return jax.lax.cond(sparse_b.all(), sparse_fn,
                        lambda: jax.lax.cond(sparse_b.any(), mixed, dense_fn))


def _roll_rows(x_bt: jax.Array, shift_b: jax.Array) -> jax.Array:
    """Each row rotated left along axis 1 by its own ``shift_b`` (negative: right)."""
    return jax.vmap(lambda row, s: jnp.roll(row, -s, axis=0))(x_bt, shift_b)


_DENSE_CHUNK = 64


def _dense_in_chunks(attend, q_btnd: jax.Array, q_seg_bt: jax.Array, q_start,
                     k_seg_bs: jax.Array, chunk: int = _DENSE_CHUNK) -> jax.Array:
    """Dense attention ``attend(q_chunk, mask_chunk)`` over query chunks (queries in slots
    ``q_start ..``), each chunk making its own ``[chunk, S]`` mask from the segment ids and
    rematerialised in the backward pass: memory O(chunk x S), never a ``[T, S]`` array. For the
    dense branch that a long call compiles next to InfLLM v2 but may never run."""
    b, t, n, d = q_btnd.shape
    s_len = k_seg_bs.shape[1]
    k_slot = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
    nc = -(-t // chunk)
    pad = nc * chunk - t
    q = jnp.pad(q_btnd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, chunk, n, d)
    seg = jnp.pad(q_seg_bt, ((0, 0), (0, pad))).reshape(b, nc, chunk)
    q_slot = jnp.broadcast_to(q_start + jnp.arange(nc * chunk, dtype=jnp.int32),
                              (b, nc * chunk)).reshape(b, nc, chunk)

    @jax.checkpoint
    def one_chunk(args):
        q_c, seg_c, slot_c = args
        return attend(q_c, attention_mask(slot_c, seg_c, k_slot, k_seg_bs))

    out = jax.lax.map(one_chunk, (q.swapaxes(0, 1), seg.swapaxes(0, 1), q_slot.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, nc * chunk, n, d)[:, :t]


def _infllm_from_first_token(q_btnd, k_bskd, v_bskd, cfg, segment_ids_bt, k_pre_rope_btkd):
    """InfLLM v2 with blocks and kernels counted from each row's first real token.

    Rows with leading padding (segment id 0, as ``left_pad`` makes them) are rotated left by it
    for the InfLLM call (the padding becomes trailing, never attended) and back after; such a row
    whose own length is below ``dense_len`` gets dense attention. So a left-padded row gives the
    outputs of the sequence alone. Without leading padding (training, packing, trailing padding)
    this is the InfLLM call as it is.
    """
    sparse_cfg = cfg.sparse_config

    def infllm(q, k, v, seg, k_pre):
        return infllmv2_attention(q, k, v, sparse_cfg, implementation="xla", segment_ids=seg,
                                  scoring_keys=k_pre)

    plain = lambda: infllm(q_btnd, k_bskd, v_bskd, segment_ids_bt, k_pre_rope_btkd)
    if segment_ids_bt is None:
        return plain()
    t = k_bskd.shape[1]
    lead = leading_padding(segment_ids_bt)

    def padded():
        roll = lambda x: None if x is None else _roll_rows(x, lead)
        out = _roll_rows(infllm(roll(q_btnd), roll(k_bskd), roll(v_bskd), roll(segment_ids_bt),
                                roll(k_pre_rope_btkd)), -lead)
        if sparse_cfg.dense_len in (-1, 0):
            return out
        return _per_row(t - lead >= sparse_cfg.dense_len, lambda: out,
                        lambda: _dense_in_chunks(
                            lambda q, mask: dense_attention(q, k_bskd, v_bskd, mask),
                            q_btnd, segment_ids_bt, 0, segment_ids_bt))

    return jax.lax.cond((lead > 0).any(), padded, plain)


def attention(q_btnd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
              cfg: ModelConfig, segment_ids_bt: jax.Array | None = None,
              k_pre_rope_btkd: jax.Array | None = None) -> jax.Array:
    """Pick the attention implementation for this call (shapes are static under jit).

    With a ``sparse_config`` and at least ``dense_len`` keys this is InfLLM v2 (the gathered
    plain-JAX path), which takes the documents from ``segment_ids_bt`` instead of the mask;
    ``k_pre_rope_btkd`` are the keys it scores blocks with when ``use_nope``. Blocks and kernels
    count from each row's first real token (leading padding does not shift them).
    """
    if _needs_sparse(k_bskd.shape[1], cfg):
        return _infllm_from_first_token(q_btnd, k_bskd, v_bskd, cfg, segment_ids_bt,
                                        k_pre_rope_btkd)
    return dense_attention(q_btnd, k_bskd, v_bskd, mask_bts)


class SparseCacheView(NamedTuple):
    """What InfLLM v2 needs in a cached call besides the keys and values: the compressed keys
    (all layers, ``[L, B, C, K, D]``, already including the new keys), the first new slot,
    each row's leading padding slots, and the segment ids of the new queries and of every slot."""

    kernels: jax.Array
    coarse_kernels: Optional[jax.Array]
    start: jax.Array
    lead: jax.Array
    q_segment_ids: jax.Array
    k_segment_ids: jax.Array


def cached_attention(q_btnd: jax.Array, k_lbksd: jax.Array, v_lbksd: jax.Array, layer,
                     mask_bts: jax.Array, cfg: ModelConfig,
                     sparse: SparseCacheView | None = None) -> jax.Array:
    """:func:`attention` of T new queries over layer ``layer`` of the KV cache (head-major
    ``[L, B, K, S, D]``, the new keys and values already written).

    Dense unless InfLLM v2 applies. The dense switch is per row: a row whose key length (its
    real tokens up to the last new one) is below ``dense_len`` is dense, exactly the cache-less
    dense attention; from ``dense_len`` on (always with ``dense_len = -1``) it is InfLLM v2 over
    the cache (:func:`mcpm_kernels.infllmv2.decode.cached_sparse_attention`), which needs
    ``sparse``, the compressed keys.
    """
    def dense_layer(q, mask):
        k = jax.lax.dynamic_index_in_dim(k_lbksd, layer, keepdims=False).astype(q_btnd.dtype)
        v = jax.lax.dynamic_index_in_dim(v_lbksd, layer, keepdims=False).astype(q_btnd.dtype)
        return dense_attention_head_major(q, k, v, mask)

    if not sparse_possible(cfg, k_lbksd.shape[3]):
        return dense_layer(q_btnd, mask_bts)
    if sparse is None:
        raise ValueError("InfLLM v2 over a KV cache needs its compressed keys (sparse=)")

    def dense():
        if q_btnd.shape[1] <= _DENSE_CHUNK:
            return dense_layer(q_btnd, mask_bts)
        # a long prefill next to the sparse branch: never a [T, S] score array
        return _dense_in_chunks(dense_layer, q_btnd, sparse.q_segment_ids, sparse.start,
                                sparse.k_segment_ids, _DENSE_CHUNK)

    def sparse_fn():
        return cached_sparse_attention(q_btnd, k_lbksd, v_lbksd, layer, sparse.kernels,
                                       sparse.coarse_kernels, sparse.start, sparse.lead,
                                       sparse.q_segment_ids, sparse.k_segment_ids,
                                       cfg.sparse_config).astype(q_btnd.dtype)

    dense_len = cfg.sparse_config.dense_len
    if dense_len in (-1, 0):
        return sparse_fn()
    key_len = sparse.start + q_btnd.shape[1] - sparse.lead                       # [B]
    return _per_row(key_len >= dense_len, sparse_fn, dense)
