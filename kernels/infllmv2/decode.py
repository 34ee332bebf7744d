"""InfLLM v2 over a KV cache (spec section 3, "Decode"): the compressed-key cache, extended
incrementally, and sparse attention of new queries over the cached keys.

Fixed shapes under jit, whatever the number of tokens written so far:

* **Kernel cache** ``[L, B, C, K, D]`` float32, ``C = num_kernels(max_len)`` slots: slot c holds
  ``mean(keys[c*stride : c*stride + kernel_size])`` once that kernel is complete (zeros before).
  With ``lse_approx`` a second one holds the coarse kernels (4x size and stride).
* **Key tail** ``[L, B, R, K, D]`` float32: the scoring keys (post-RoPE, or pre-RoPE with
  ``use_nope``) of the last ``R`` slots written, ``R`` = the largest kernel size - 1. A call
  that writes T new keys completes at most ``ceil(T / stride)`` kernels (one per decode step),
  each made of tail and new keys only, so the full keys are never read again.

Positions are counted from each row's first real token: a row whose first ``lead`` slots are
left padding has its key at real position r in slot ``lead + r``, its kernels and blocks start
at slot ``lead``. So a left-padded row selects exactly what the sequence alone would.

Selection of a query at real position i uses the reference's own functions
(:func:`~mcpm_kernels.infllmv2.reference.kernel_scores`, ``block_scores``,
``select_block_lists_from_scores``) over all kernel slots and ``ceil(max_len / block_size)``
blocks. Slots of kernels that do not exist yet are never visible (a kernel is visible to i iff
it is complete at i), so their relevance is 0, like the invisible kernels of a longer prefill;
the blocks made only of them are future blocks, never valid picks, and rank at or below every
valid candidate (whose scores are >= 0, ties going to the lower block index in ``top_k``), so
the selected set equals the prefill's at that length. Attention then gathers the ``topk + W``
selected blocks of ``block_size`` keys per query from the cache.

Letters: L layers, B batch, T new positions, S cache slots, N query heads, K kv heads,
G = N / K, D head_dim, C kernel slots, M key blocks, P blocks per query.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcpm_kernels.infllmv2.reference import (block_scores, coarse_kernel_sizes, kernel_scores,
                                             num_kernels, select_block_lists_from_scores)


def compressed_cache_sizes(cfg, max_len: int) -> tuple[int, int, int]:
    """(kernel slots, coarse-kernel slots (0 without ``lse_approx``), key-tail slots) of a cache
    with ``max_len`` slots (at least one kernel slot each, so no array is empty)."""
    ks, st = cfg.kernel_size, cfg.kernel_stride
    c = max(1, num_kernels(max_len, ks, st))
    if not cfg.lse_approx:
        return c, 0, ks - 1
    cks, cst = coarse_kernel_sizes(ks, st)
    return c, max(1, num_kernels(max_len, cks, cst)), cks - 1


def leading_padding(segment_ids_bs: jax.Array) -> jax.Array:
    """``[B]`` int32: the number of padding slots (segment id 0) before each row's first real
    token (0 for a row with no real token)."""
    real = segment_ids_bs != 0
    return jnp.where(real.any(axis=1), jnp.argmax(real, axis=1), 0).astype(jnp.int32)


def _append_kernels(kc_lbckd: jax.Array, layer, buf_bnkd: jax.Array, buf_first_slot,
                    lead_b: jax.Array, first_real_b: jax.Array, t: int, size: int, stride: int
                    ) -> jax.Array:
    """Write the kernels whose last key lies in the new chunk (real positions
    ``first_real_b .. first_real_b + t - 1``) into layer ``layer`` of the kernel cache.
    ``buf_bnkd``: scoring keys of slots ``buf_first_slot ..``, covering every such kernel."""
    b, cmax = buf_bnkd.shape[0], kc_lbckd.shape[2]
    n = -(-t // stride)                                   # kernels ends are `stride` apart
    c_lo = jnp.maximum(0, -((size - 1 - first_real_b) // stride))      # first end >= chunk start
    c = c_lo[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]        # [B, n]
    end = c * stride + size - 1
    ok = (end >= first_real_b[:, None]) & (end < first_real_b[:, None] + t) & (c < cmax)
    first = lead_b[:, None] + c * stride - buf_first_slot              # buffer index of key 0
    gi = jnp.clip(first[..., None] + jnp.arange(size), 0, buf_bnkd.shape[1] - 1)  # [B, n, size]
    vals = buf_bnkd[jnp.arange(b)[:, None, None], gi].mean(axis=2)     # [B, n, K, D]
    slot = jnp.where(ok, c, cmax)                                      # cmax: dropped
    return kc_lbckd.at[layer, jnp.arange(b)[:, None], slot].set(vals, mode="drop")


def append_keys(kernels_lbckd: jax.Array, coarse_lbckd: jax.Array | None, tail_lbrkd: jax.Array,
                layer, keys_btkd: jax.Array, start, lead_b: jax.Array, cfg):
    """Extend layer ``layer`` of the compressed-key cache with T new scoring keys written at
    slots ``start .. start + T - 1`` (``keys_btkd``: post-RoPE keys, or pre-RoPE with use_nope).

    ``lead_b [B]``: each row's leading padding slots. Returns (kernels, coarse or None, tail).
    """
    t, r = keys_btkd.shape[1], tail_lbrkd.shape[2]
    prev = jax.lax.dynamic_index_in_dim(tail_lbrkd, layer, keepdims=False)
    buf = jnp.concatenate([prev, keys_btkd.astype(jnp.float32)], axis=1)   # slots start-R ..
    first_real = start - lead_b
    ks, st = cfg.kernel_size, cfg.kernel_stride
    kernels_lbckd = _append_kernels(kernels_lbckd, layer, buf, start - r, lead_b, first_real, t,
                                    ks, st)
    if coarse_lbckd is not None:
        cks, cst = coarse_kernel_sizes(ks, st)
        coarse_lbckd = _append_kernels(coarse_lbckd, layer, buf, start - r, lead_b, first_real,
                                       t, cks, cst)
    tail_lbrkd = jax.lax.dynamic_update_index_in_dim(tail_lbrkd, buf[:, t:], layer, axis=0)
    return kernels_lbckd, coarse_lbckd, tail_lbrkd


def select_from_kernel_cache(q_btnd: jax.Array, kc_bckd: jax.Array,
                             coarse_bckd: jax.Array | None, pos_bt: jax.Array, num_blocks: int,
                             cfg) -> tuple[jax.Array, jax.Array]:
    """Block lists ``(idx, valid) [B, K, T, P]`` of queries at real positions ``pos_bt`` (one
    row of positions per batch row) from a kernel cache ``[B, C, K, D]`` (and coarse kernels
    with ``lse_approx``) whose slots beyond the kernels complete so far are unused, over
    ``num_blocks`` blocks: the selection of a prefill at each query's length (module doc)."""
    def one_row(q_tnd, kc_ckd, coarse_ckd, pos_t):
        coarse = None if coarse_ckd is None else coarse_ckd[None]
        s = kernel_scores(q_tnd[None], kc_ckd[None], cfg.kernel_size, cfg.kernel_stride,
                          positions_t=pos_t, coarse_kc_bckd=coarse)
        scores = block_scores(s, num_blocks, cfg.block_size, cfg.kernel_stride)
        idx, valid = select_block_lists_from_scores(scores, pos_t, cfg)
        return idx[0], valid[0]

    return jax.vmap(one_row)(q_btnd, kc_bckd, coarse_bckd, pos_bt)


def _attend_gathered(q_btnd, k_lbksd, v_lbksd, layer, idx_bktp, valid_bktp, pos_bt, lead_b,
                     q_seg_bt, k_seg_bs, block_size: int):
    """Softmax attention of each query over the keys of its selected blocks, gathered from
    layer ``layer`` of the cache: ``[B, T, N, D]``."""
    b, t, n, d = q_btnd.shape
    kv, s_len = k_lbksd.shape[2], k_lbksd.shape[3]
    p = idx_bktp.shape[-1]
    kreal = (idx_bktp[..., None] * block_size + jnp.arange(block_size)).reshape(
        b, kv, t, p * block_size)                                      # real key positions
    slot = lead_b[:, None, None, None] + kreal
    slot_safe = jnp.clip(slot, 0, s_len - 1)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(kv)[None, :, None, None]
    k_g = k_lbksd[layer, bi, hi, slot_safe].astype(q_btnd.dtype)       # [B, K, T, P*bs, D]
    v_g = v_lbksd[layer, bi, hi, slot_safe].astype(q_btnd.dtype)
    key_seg = k_seg_bs[bi, slot_safe]
    mask = (jnp.repeat(valid_bktp, block_size, axis=-1) & (kreal <= pos_bt[:, None, :, None])
            & (slot < s_len) & (key_seg == q_seg_bt[:, None, :, None]) & (key_seg != 0))
    q = q_btnd.reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bktsd->bkgts", q, k_g,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    m = mask[:, :, None]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(m, jax.nn.softmax(logits, axis=-1), 0.0).astype(v_g.dtype)
    return jnp.einsum("bkgts,bktsd->btkgd", probs, v_g).reshape(b, t, n, d)


def cached_sparse_attention(q_btnd: jax.Array, k_lbksd: jax.Array, v_lbksd: jax.Array, layer,
                            kernels_lbckd: jax.Array, coarse_lbckd: jax.Array | None, start,
                            lead_b: jax.Array, q_seg_bt: jax.Array, k_seg_bs: jax.Array, cfg,
                            chunk: int = 16) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]`` of T new queries (slots ``start ..``) over layer
    ``layer`` of a KV cache whose keys, values and compressed keys already include them.

    ``lead_b``: leading padding slots per row (real position = slot - lead); ``q_seg_bt`` /
    ``k_seg_bs``: segment ids of the queries and of every cache slot (0 = padding, never
    attended). Queries go in chunks of ``chunk`` (a decode step is one chunk of one query), so
    a prefill or any chunk appended to a non-empty cache runs here too, in memory linear in T.
    """
    b, t, n, d = q_btnd.shape
    num_blocks = -(-k_lbksd.shape[3] // cfg.block_size)
    kc = jax.lax.dynamic_index_in_dim(kernels_lbckd, layer, keepdims=False)
    coarse = (None if coarse_lbckd is None
              else jax.lax.dynamic_index_in_dim(coarse_lbckd, layer, keepdims=False))
    pos = start + jnp.arange(t, dtype=jnp.int32)[None, :] - lead_b[:, None]   # [B, T]

    def one_chunk(q_c, pos_c, seg_c):
        idx, valid = select_from_kernel_cache(q_c, kc, coarse, pos_c, num_blocks, cfg)
        return _attend_gathered(q_c, k_lbksd, v_lbksd, layer, idx, valid, pos_c, lead_b, seg_c,
                                k_seg_bs, cfg.block_size)

    if t <= chunk:
        return one_chunk(q_btnd, pos, q_seg_bt)
    nc = -(-t // chunk)
    pad = nc * chunk - t
    q_c = jnp.pad(q_btnd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, chunk, n, d)
    pos_c = jnp.pad(pos, ((0, 0), (0, pad))).reshape(b, nc, chunk)
    seg_c = jnp.pad(q_seg_bt, ((0, 0), (0, pad))).reshape(b, nc, chunk)   # padded queries: seg 0
    out = jax.lax.map(lambda a: one_chunk(*a), (q_c.swapaxes(0, 1), pos_c.swapaxes(0, 1),
                                                 seg_c.swapaxes(0, 1)))  # [nc, B, chunk, N, D]
    return out.swapaxes(0, 1).reshape(b, nc * chunk, n, d)[:, :t]
