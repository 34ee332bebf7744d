"""InfLLM v2 in plain JAX, dense and O(T^2): the reference every faster path is tested against.

Semantics of spec section 3 (variant A, the released MiniCPM4-8B, by default; variant B and
the LSE approximation as ``sparse_config`` options). Dimension letters: B batch,
T positions, N query heads, K kv heads, G = N / K, D head_dim, C compressed kernels, M key blocks.

1. Kernels: ``kc[c] = mean(k[c*stride : c*stride + kernel_size])`` per kv head (complete ones).
2. Relevance: kernel c is visible to query i iff ``c*stride + kernel_size - 1 <= i``; per query
   head a softmax over visible kernels of ``q . kc / sqrt(D)``, summed over the G heads of a group.
3. Block scores: block m (keys [m*bs, (m+1)*bs)) takes the max over the bs/stride + 1 kernels
   starting at kernel (bs/stride)*m - 1 (clipped to existing ones).
4. Selection, variant A: init blocks +inf, window blocks (qb - W, qb] -inf, top-k, drop blocks
   >= qb, then add the window blocks. Variant B: init blocks and blocks qb - W .. qb +inf, top-k
   (the whole budget), drop blocks > qb. Boolean, True = attended.
5. Attention: softmax attention over keys t <= i whose block is selected.

Selection is not differentiated (stop_gradient): gradients reach K only through step 5.
With ``use_nope`` the kernels are means of the pre-RoPE keys (passed separately); the queries
are the ones given (spec 3 changes only the keys).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def num_kernels(t: int, kernel_size: int, stride: int) -> int:
    return (t - kernel_size) // stride + 1 if t >= kernel_size else 0


def compress_keys(k_btkd: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """Mean-pooled keys ``[B, C, K, D]`` (float32) of the complete kernels."""
    t = k_btkd.shape[1]
    c = num_kernels(t, kernel_size, stride)
    starts = jnp.arange(c) * stride
    idx = starts[:, None] + jnp.arange(kernel_size)[None, :]          # [C, kernel_size]
    return k_btkd.astype(jnp.float32)[:, idx].mean(axis=2)


def coarse_kernel_sizes(kernel_size: int, stride: int) -> tuple[int, int]:
    """Kernel size and stride of the LSE approximation's coarse kernels (128 every 64 in the 8B)."""
    return 4 * kernel_size, 4 * stride


def _visible(c: int, kernel_size: int, stride: int, pos_t: jax.Array) -> jax.Array:
    """``[T, C]``: kernel c lies entirely at or before the query."""
    return (jnp.arange(c)[None, :] * stride + kernel_size - 1) <= pos_t[:, None]


def kernel_scores(q_btnd: jax.Array, kc_bckd: jax.Array, kernel_size: int, stride: int,
                  positions_t: jax.Array | None = None,
                  coarse_kc_bckd: jax.Array | None = None) -> jax.Array:
    """Group relevance ``[B, K, T, C]``: per-head softmax over visible kernels, summed over G.

    ``positions_t``: the queries' positions (default 0..T-1; a chunk of queries passes its own).
    ``coarse_kc_bckd``: the LSE approximation; the softmax normaliser is the log-sum-exp over
    the visible coarse kernels (see :func:`coarse_kernel_sizes`) instead of the fine ones, or
    the exact one for a query that sees no coarse kernel yet.
    """
    b, t, n, d = q_btnd.shape
    c, kv = kc_bckd.shape[1], kc_bckd.shape[2]
    pos = jnp.arange(t) if positions_t is None else positions_t
    q = q_btnd.astype(jnp.float32).reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bckd->bkgtc", q, kc_bckd) / math.sqrt(d)
    visible_tc = _visible(c, kernel_size, stride, pos)
    logits = jnp.where(visible_tc, logits, -jnp.inf)
    any_visible = visible_tc.any(axis=-1)[:, None]
    lse = jax.nn.logsumexp(jnp.where(any_visible, logits, 0.0), axis=-1, keepdims=True)
    if coarse_kc_bckd is not None:
        cks, cst = coarse_kernel_sizes(kernel_size, stride)
        coarse_vis = _visible(coarse_kc_bckd.shape[1], cks, cst, pos)
        coarse = jnp.einsum("btkgd,bckd->bkgtc", q, coarse_kc_bckd) / math.sqrt(d)
        coarse_lse = jax.nn.logsumexp(jnp.where(coarse_vis, coarse, -jnp.inf), axis=-1,
                                      keepdims=True)
        lse = jnp.where(coarse_vis.any(axis=-1)[:, None], coarse_lse, lse)
    probs = jnp.where(visible_tc, jnp.exp(logits - lse), 0.0)
    return probs.sum(axis=2)


def block_scores(s_bktc: jax.Array, num_blocks: int, block_size: int, stride: int) -> jax.Array:
    """Max-pool kernel scores onto key blocks: ``[B, K, T, M]`` (-inf where no kernel exists)."""
    per = block_size // stride
    c = s_bktc.shape[-1]
    j = (jnp.arange(num_blocks) * per - 1)[:, None] + jnp.arange(per + 1)[None, :]  # [M, per+1]
    if c == 0:
        return jnp.full(s_bktc.shape[:-1] + (num_blocks,), -jnp.inf, s_bktc.dtype)
    gathered = s_bktc[..., jnp.clip(j, 0, c - 1)]
    return jnp.where((j >= 0) & (j < c), gathered, -jnp.inf).max(axis=-1)


def forced_scores(scores_bktm: jax.Array, positions_t: jax.Array, block_size: int,
                  window_size: int, init_blocks: int, variant: str = "A"
                  ) -> tuple[jax.Array, jax.Array]:
    """Forcing before top-k. Variant A: window blocks ``(qb - W, qb]`` get -inf (attended anyway,
    outside the top-k), init blocks +inf. Variant B: init blocks and blocks ``qb - W .. qb`` get
    +inf (they take part of the top-k budget). Returns (scores, separate window ``[T, M]``:
    the blocks attended besides the top-k; empty in variant B)."""
    m = scores_bktm.shape[-1]
    qb = (positions_t // block_size)[:, None]                         # [T, 1]
    blk = jnp.arange(m)[None, :]                                      # [1, M]
    w = window_size // block_size
    if variant == "B":
        forced = (blk < init_blocks) | ((blk >= qb - w) & (blk <= qb))
        return jnp.where(forced, jnp.inf, scores_bktm), jnp.zeros_like(forced)
    in_window = (blk > qb - w) & (blk <= qb)
    s = jnp.where(in_window, -jnp.inf, scores_bktm)
    return jnp.where(blk < init_blocks, jnp.inf, s), in_window


def select_blocks(scores_bktm: jax.Array, block_size: int, window_size: int, init_blocks: int,
                  topk: int, variant: str = "A") -> jax.Array:
    """Boolean selection ``[B, K, T, M]`` from block scores, window and init blocks included."""
    t, m = scores_bktm.shape[2], scores_bktm.shape[3]
    pos = jnp.arange(t)
    s, window = forced_scores(scores_bktm, pos, block_size, window_size, init_blocks, variant)
    _, top_idx = jax.lax.top_k(s, min(topk, m))                       # [B, K, T, k]
    chosen = jnp.any(jax.nn.one_hot(top_idx, m, dtype=jnp.bool_), axis=-2)
    qb = (pos // block_size)[:, None]
    if variant == "B":
        return chosen & (jnp.arange(m)[None, :] <= qb)               # drop future blocks
    chosen &= jnp.arange(m)[None, :] < qb                             # drop blocks >= qb
    return chosen | window


def select_block_lists_from_scores(scores_bktm: jax.Array, positions_t: jax.Array, cfg
                                   ) -> tuple[jax.Array, jax.Array]:
    """The same selection as :func:`select_blocks` as per-query block lists:
    ``(idx [B, K, T, P] int32, valid [B, K, T, P] bool)``, no valid index twice.

    Variant A: P = topk + W; the first slots are the top-k choice (valid where it is a past
    block outside the window), the last W the window blocks ``qb-W+1 .. qb`` (valid where >= 0).
    Variant B: P = topk, valid where the block is not in the future.
    """
    b, kv, t, m = scores_bktm.shape
    bs = cfg.block_size
    s, _ = forced_scores(scores_bktm, positions_t, bs, cfg.window_size, cfg.init_blocks,
                         cfg.variant)
    _, top = jax.lax.top_k(s, min(cfg.topk, m))                       # [B, K, T, k]
    qb = (positions_t // bs)[None, None, :, None]
    if cfg.variant == "B":
        return top.astype(jnp.int32), top <= qb
    w = cfg.window_size // bs
    win = jnp.broadcast_to(qb - w + 1 + jnp.arange(w), (b, kv, t, w))
    idx = jnp.concatenate([top, win], axis=-1).astype(jnp.int32)
    valid = jnp.concatenate([top <= qb - w, win >= 0], axis=-1)
    return idx, valid


def scoring_inputs(q_btnd: jax.Array, k_btkd: jax.Array, cfg,
                   k_for_scoring_btkd: jax.Array | None = None):
    """Stage-1 inputs under stop_gradient: (q, kernels ``[B, C, K, D]``, coarse kernels or None).
    ``k_for_scoring_btkd``: the pre-RoPE keys when ``use_nope``."""
    keys = k_btkd if k_for_scoring_btkd is None else k_for_scoring_btkd
    keys, q = jax.lax.stop_gradient(keys), jax.lax.stop_gradient(q_btnd)
    kc = compress_keys(keys, cfg.kernel_size, cfg.kernel_stride)
    coarse = None
    if cfg.lse_approx:
        coarse = compress_keys(keys, *coarse_kernel_sizes(cfg.kernel_size, cfg.kernel_stride))
    return q, kc, coarse


def block_mask(q_btnd: jax.Array, k_btkd: jax.Array, cfg, k_for_scoring_btkd=None) -> jax.Array:
    """``[B, K, T, M]`` boolean block selection (True = attended). Below ``dense_len`` every
    block a query can see is selected. ``k_for_scoring_btkd``: pre-RoPE keys when use_nope."""
    b, t, n, d = q_btnd.shape
    m = -(-t // cfg.block_size)
    kv = k_btkd.shape[2]
    if cfg.dense_len != -1 and t < cfg.dense_len:
        qb = (jnp.arange(t) // cfg.block_size)[:, None]
        return jnp.broadcast_to(jnp.arange(m)[None, :] <= qb, (b, kv, t, m))
    q, kc, coarse = scoring_inputs(q_btnd, k_btkd, cfg, k_for_scoring_btkd)
    s = kernel_scores(q, kc, cfg.kernel_size, cfg.kernel_stride, coarse_kc_bckd=coarse)
    scores = block_scores(s, m, cfg.block_size, cfg.kernel_stride)
    return select_blocks(scores, cfg.block_size, cfg.window_size, cfg.init_blocks, cfg.topk,
                         cfg.variant)


def attention_reference(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, cfg,
                        segment_ids_bt: jax.Array | None = None,
                        k_for_scoring_btkd: jax.Array | None = None) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]`` as dense attention under the expanded block mask.

    ``segment_ids_bt``: packed documents (0 = padding); keys of another document are never
    attended. Selection itself runs over the whole row (documents do not get separate kernels).
    """
    b, t, n, d = q_btnd.shape
    kv = k_btkd.shape[2]
    sel_bktm = block_mask(q_btnd, k_btkd, cfg, k_for_scoring_btkd)
    key_block = jnp.arange(t) // cfg.block_size
    allowed = sel_bktm[..., key_block]                                # [B, K, T, S]
    allowed &= jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    if segment_ids_bt is not None:
        same = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
        allowed &= same & (segment_ids_bt[:, None, None, :] != 0)
    q = q_btnd.reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_btkd,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    mask = allowed[:, :, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0).astype(v_btkd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_btkd)
    return out.reshape(b, t, n, d)
