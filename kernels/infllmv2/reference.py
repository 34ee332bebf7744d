"""InfLLM v2 in plain JAX, dense and O(T^2): the reference every faster path is tested against.

Semantics of spec section 3 (variant A, the released MiniCPM4-8B). Dimension letters: B batch,
T positions, N query heads, K kv heads, G = N / K, D head_dim, C compressed kernels, M key blocks.

1. Kernels: ``kc[c] = mean(k[c*stride : c*stride + kernel_size])`` per kv head (complete ones).
2. Relevance: kernel c is visible to query i iff ``c*stride + kernel_size - 1 <= i``; per query
   head a softmax over visible kernels of ``q . kc / sqrt(D)``, summed over the G heads of a group.
3. Block scores: block m (keys [m*bs, (m+1)*bs)) takes the max over the bs/stride + 1 kernels
   starting at kernel (bs/stride)*m - 1 (clipped to existing ones).
4. Selection: init blocks +inf, window blocks (qb - W, qb] -inf, top-k, drop blocks >= qb, then
   add the window blocks. Boolean, True = attended.
5. Attention: softmax attention over keys t <= i whose block is selected.

Selection is not differentiated (stop_gradient): gradients reach K only through step 5.
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


def kernel_scores(q_btnd: jax.Array, kc_bckd: jax.Array, kernel_size: int, stride: int,
                  positions_t: jax.Array | None = None) -> jax.Array:
    """Group relevance ``[B, K, T, C]``: per-head softmax over visible kernels, summed over G.

    ``positions_t``: the queries' positions (default 0..T-1; a chunk of queries passes its own).
    """
    b, t, n, d = q_btnd.shape
    c, kv = kc_bckd.shape[1], kc_bckd.shape[2]
    pos = jnp.arange(t) if positions_t is None else positions_t
    q = q_btnd.astype(jnp.float32).reshape(b, t, kv, n // kv, d)
    logits = jnp.einsum("btkgd,bckd->bkgtc", q, kc_bckd) / math.sqrt(d)
    visible_tc = (jnp.arange(c)[None, :] * stride + kernel_size - 1) <= pos[:, None]
    logits = jnp.where(visible_tc, logits, -jnp.inf)
    any_visible = visible_tc.any(axis=-1)[:, None]
    probs = jnp.where(any_visible, jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1),
                      0.0)
    probs = jnp.where(visible_tc, probs, 0.0)
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
                  window_size: int, init_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Variant A's forcing before top-k: window blocks ``(qb - W, qb]`` get -inf (they are
    attended anyway), init blocks +inf. Returns (scores, in_window ``[T, M]``)."""
    m = scores_bktm.shape[-1]
    qb = (positions_t // block_size)[:, None]                         # [T, 1]
    blk = jnp.arange(m)[None, :]                                      # [1, M]
    in_window = (blk > qb - window_size // block_size) & (blk <= qb)
    s = jnp.where(in_window, -jnp.inf, scores_bktm)
    return jnp.where(blk < init_blocks, jnp.inf, s), in_window


def select_blocks(scores_bktm: jax.Array, block_size: int, window_size: int, init_blocks: int,
                  topk: int) -> jax.Array:
    """Variant A selection: boolean ``[B, K, T, M]``, window and init blocks included."""
    t, m = scores_bktm.shape[2], scores_bktm.shape[3]
    pos = jnp.arange(t)
    s, in_window = forced_scores(scores_bktm, pos, block_size, window_size, init_blocks)
    _, top_idx = jax.lax.top_k(s, min(topk, m))                       # [B, K, T, k]
    chosen = jnp.any(jax.nn.one_hot(top_idx, m, dtype=jnp.bool_), axis=-2)
    chosen &= jnp.arange(m)[None, :] < (pos // block_size)[:, None]   # drop blocks >= qb
    return chosen | in_window


def block_mask(q_btnd: jax.Array, k_btkd: jax.Array, cfg, k_for_scoring_btkd=None) -> jax.Array:
    """``[B, K, T, M]`` boolean block selection (True = attended). Below ``dense_len`` every
    block a query can see is selected. ``k_for_scoring_btkd``: pre-RoPE keys when use_nope."""
    b, t, n, d = q_btnd.shape
    m = -(-t // cfg.block_size)
    kv = k_btkd.shape[2]
    if cfg.dense_len != -1 and t < cfg.dense_len:
        qb = (jnp.arange(t) // cfg.block_size)[:, None]
        return jnp.broadcast_to(jnp.arange(m)[None, :] <= qb, (b, kv, t, m))
    keys = k_btkd if k_for_scoring_btkd is None else k_for_scoring_btkd
    keys, q = jax.lax.stop_gradient(keys), jax.lax.stop_gradient(q_btnd)
    kc = compress_keys(keys, cfg.kernel_size, cfg.kernel_stride)
    s = kernel_scores(q, kc, cfg.kernel_size, cfg.kernel_stride)
    scores = block_scores(s, m, cfg.block_size, cfg.kernel_stride)
    return select_blocks(scores, cfg.block_size, cfg.window_size, cfg.init_blocks, cfg.topk)


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
