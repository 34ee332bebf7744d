"""InfLLM v2 in plain JAX with memory linear in T: per-query block lists, gathered keys.

Queries are processed in chunks (``lax.map``), so no ``[T, T]`` or ``[T, kernels]`` array is
ever whole: stage 1 keeps one chunk's ``[B, K, G, chunk, C]`` relevance scores, and stage 2
gathers, for each query, the keys of its ``topk + W`` selected blocks. Each chunk is
rematerialised in the backward pass, so residuals stay linear in T too.

Same semantics as :mod:`mcpm_kernels.infllmv2.reference` (both variants); see that module's
docstring for the steps. Letters: B batch, T positions, N query heads, K kv heads, G = N / K,
D head_dim, C kernels, M key blocks, P = topk + W selected blocks per query.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcpm_kernels.infllmv2.reference import (attention_reference, block_scores, kernel_scores,
                                             scoring_inputs, select_block_lists_from_scores)


def _pad_to(x: jax.Array, multiple: int, axis: int = 1) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def select_block_lists(q_btnd: jax.Array, k_btkd: jax.Array, cfg, chunk: int = 64,
                       k_for_scoring_btkd: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """Per query, the blocks to attend: ``(idx [B, K, T, P] int32, valid [B, K, T, P])``, see
    :func:`~mcpm_kernels.infllmv2.reference.select_block_lists_from_scores`. Stage 1 runs in
    query chunks, so no ``[T, C]`` or ``[T, M]`` array is ever whole."""
    b, t, n, d = q_btnd.shape
    ks, st, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    m = -(-t // bs)
    q, kc_bckd, coarse_bckd = scoring_inputs(q_btnd, k_btkd, cfg, k_for_scoring_btkd)
    q_chunks = _pad_to(q, chunk).reshape(b, -1, chunk, n, d).transpose(1, 0, 2, 3, 4)

    def one_chunk(args):
        q_bqnd, start = args
        pos = start + jnp.arange(chunk)
        s_bkqc = kernel_scores(q_bqnd, kc_bckd, ks, st, positions_t=pos,
                               coarse_kc_bckd=coarse_bckd)
        scores = block_scores(s_bkqc, m, bs, st)                               # [B,K,chunk,M]
        return select_block_lists_from_scores(scores, pos, cfg)

    starts = jnp.arange(q_chunks.shape[0]) * chunk
    idx, valid = jax.lax.map(one_chunk, (q_chunks, starts))           # [nc, B, K, chunk, P]
    p = idx.shape[-1]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, -1, q_chunks.shape[0] * chunk, p)[:, :, :t]
    valid = valid.transpose(1, 2, 0, 3, 4).reshape(b, -1, q_chunks.shape[0] * chunk, p)[:, :, :t]
    return idx, valid


def attention_xla(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, cfg,
                  segment_ids_bt: jax.Array | None = None, chunk: int = 16,
                  select_chunk: int = 64, k_for_scoring_btkd: jax.Array | None = None
                  ) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]`` over gathered blocks; memory linear in T.
    ``k_for_scoring_btkd``: the pre-RoPE keys when ``use_nope``."""
    b, t, n, d = q_btnd.shape
    kv = k_btkd.shape[2]
    g = n // kv
    bs = cfg.block_size
    if cfg.dense_len != -1 and t < cfg.dense_len:
        return attention_reference(q_btnd, k_btkd, v_btkd, cfg, segment_ids_bt)
    idx, valid = select_block_lists(q_btnd, k_btkd, cfg, select_chunk, k_for_scoring_btkd)
    p = idx.shape[-1]
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones((b, t), jnp.int32)
    # keys/values padded to whole blocks, head-major for the gather
    k_bksd = _pad_to(k_btkd, bs).transpose(0, 2, 1, 3)
    v_bksd = _pad_to(v_btkd, bs).transpose(0, 2, 1, 3)
    seg_bs = _pad_to(segment_ids_bt, bs)
    nc = -(-t // chunk)
    q_c = _pad_to(q_btnd, chunk).reshape(b, nc, chunk, kv, g, d).transpose(1, 0, 2, 3, 4, 5)
    idx_c = _pad_to(idx, chunk, axis=2).reshape(b, kv, nc, chunk, p).transpose(2, 0, 1, 3, 4)
    ok_c = _pad_to(valid, chunk, axis=2).reshape(b, kv, nc, chunk, p).transpose(2, 0, 1, 3, 4)
    seg_c = _pad_to(segment_ids_bt, chunk).reshape(b, nc, chunk).transpose(1, 0, 2)
    starts = jnp.arange(nc) * chunk
    batch = jnp.arange(b)[:, None, None, None]
    head = jnp.arange(kv)[None, :, None, None]

    @jax.checkpoint  # recompute each chunk in the backward pass: residuals stay O(T)
    def one_chunk(args):
        q_bqkgd, idx_bkqp, ok_bkqp, seg_bq, start = args
        kpos = (idx_bkqp[..., None] * bs + jnp.arange(bs)).reshape(b, kv, chunk, p * bs)
        kpos_safe = jnp.clip(kpos, 0, k_bksd.shape[2] - 1)
        k_g = k_bksd[batch, head, kpos_safe]                                # [B,K,chunk,S,D]
        v_g = v_bksd[batch, head, kpos_safe]
        qpos = start + jnp.arange(chunk)
        mask = (jnp.repeat(ok_bkqp, bs, axis=-1) & (kpos <= qpos[None, None, :, None])
                & (kpos < t))
        key_seg = seg_bs[jnp.arange(b)[:, None, None, None], kpos_safe]
        mask &= (key_seg == seg_bq[:, None, :, None]) & (key_seg != 0)
        logits = jnp.einsum("bqkgd,bkqsd->bkgqs", q_bqkgd, k_g,
                            preferred_element_type=jnp.float32) / math.sqrt(d)
        m4 = mask[:, :, None]
        logits = jnp.where(m4, logits, jnp.finfo(jnp.float32).min)
        probs = jnp.where(m4, jax.nn.softmax(logits, axis=-1), 0.0).astype(v_g.dtype)
        return jnp.einsum("bkgqs,bkqsd->bqkgd", probs, v_g)

    out = jax.lax.map(one_chunk, (q_c, idx_c, ok_c, seg_c, starts))         # [nc,B,chunk,K,G,D]
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, nc * chunk, n, d)[:, :t]
    return out.astype(q_btnd.dtype)
