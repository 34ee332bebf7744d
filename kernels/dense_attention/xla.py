"""Memory-efficient dense causal grouped-query attention in plain JAX (FlashAttention-2 style).

The fair dense baseline for InfLLM v2 on a CPU: the same math as ``softmax(q k^T / sqrt(D)
masked) v`` but never an array of ``[T, T]`` scores.

* Queries in chunks of ``q_chunk`` positions; the G query heads that share a kv head are folded
  into the rows of one tile (``q_chunk * G`` rows against ``k_chunk`` keys), so every matmul is a
  plain ``[rows, D] x [D, keys]`` product.
* Keys in chunks with an online softmax in float32. Key chunks entirely after the query chunk are
  skipped (a loop with a dynamic trip count), so the work is about ``T^2 / 2``; only the key
  chunk that holds the diagonal is masked (and every chunk when ``segment_ids`` are given).
* A custom VJP: the forward keeps only the output and the per-row log-sum-exp, the backward
  recomputes the scores chunk by chunk (outer loop over key chunks accumulating dK and dV, dQ
  accumulated in place), so forward+backward memory is linear in T.

Letters: B batch, T positions, N query heads, K kv heads, G = N / K, D head_dim, R = rows of a
query tile (``q_chunk * G``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity" for running maxima: no inf - inf in rows that see nothing


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tiles(t: int, q_chunk: int, k_chunk: int) -> tuple[int, int, int]:
    """Chunk sizes for length t: k_chunk a multiple of q_chunk, both no longer than needed."""
    q_chunk = min(q_chunk, _round_up(t, 8))
    k_chunk = max(q_chunk, min(_round_up(k_chunk, q_chunk), _round_up(t, q_chunk)))
    return q_chunk, k_chunk, _round_up(t, k_chunk)


def _scores(q_brd, k_bksd):
    return jnp.einsum("bkrd,bksd->bkrs", q_brd, k_bksd, preferred_element_type=jnp.float32)


def _mask(i, j, tq, tk, g, seg_q, seg_k, causal: bool):
    """``[B, 1, R, tk]`` (or None): keys visible to the rows of query chunk i in key chunk j."""
    mask = None
    if causal:
        qpos = i * tq + jnp.arange(tq * g) // g
        kpos = j * tk + jnp.arange(tk)
        mask = (kpos[None, :] <= qpos[:, None])[None, None]
    if seg_q is not None:
        sq = jnp.repeat(seg_q, g, axis=1)                                  # [B, R]
        same = (sq[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] != 0)
        mask = same[:, None] if mask is None else mask & same[:, None]
    return mask


def _online_init(b, kv, r, d):
    """Running max, sum and unnormalised output of ``r`` rows before any key."""
    return (jnp.full((b, kv, r), _NEG, jnp.float32), jnp.zeros((b, kv, r), jnp.float32),
            jnp.zeros((b, kv, r, d), jnp.float32))


def _online_update(carry, s_bkrs, v_bksd):
    """One key chunk of the online softmax: masked scores are -inf."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s_bkrs.max(axis=-1))
    p = jnp.exp(s_bkrs - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum("bkrs,bksd->bkrd", p, v_bksd)
    return m_new, l, acc


def _online_finish(m, l, acc):
    """(normalised output, log-sum-exp); rows that saw no key give 0 and +inf."""
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return out, lse


def _forward(q_bkrd, k_bksd, v_bksd, seg_bt, tq, tk, g):
    """Output ``[B, K, T*G, D]`` (unnormalised rows of empty queries are 0) and the row
    log-sum-exp ``[B, K, T*G]`` (+inf for rows that see no key)."""
    b, kv, rows, d = q_bkrd.shape
    tp = rows // g
    nq = tp // tq
    r = tq * g

    def key_slice(x, j):
        return jax.lax.dynamic_slice_in_dim(x, j * tk, tk, axis=2)

    def one_q_chunk(i):
        q_i = jax.lax.dynamic_slice_in_dim(q_bkrd, i * r, r, axis=2)
        seg_q = None if seg_bt is None else jax.lax.dynamic_slice_in_dim(seg_bt, i * tq, tq, 1)

        def step(j, carry, causal):
            s = _scores(q_i, key_slice(k_bksd, j))
            seg_k = None if seg_bt is None else jax.lax.dynamic_slice_in_dim(seg_bt, j * tk, tk, 1)
            mask = _mask(i, j, tq, tk, g, seg_q, seg_k, causal)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            return _online_update(carry, s, key_slice(v_bksd, j))

        j_diag = (i * tq) // tk
        carry = jax.lax.fori_loop(0, j_diag, functools.partial(step, causal=False),
                                  _online_init(b, kv, r, d))
        return _online_finish(*step(j_diag, carry, causal=True))

    out, lse = jax.lax.map(one_q_chunk, jnp.arange(nq))                # [nq, B, K, R, (D)]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, kv, rows, d)
    lse = lse.transpose(1, 2, 0, 3).reshape(b, kv, rows)
    return out, lse


def _backward(q_bkrd, k_bksd, v_bksd, seg_bt, out, lse, dout, tq, tk, g):
    b, kv, rows, d = q_bkrd.shape
    tp = rows // g
    nk = tp // tk
    r = tq * g
    per = tk // tq                          # query chunks on the diagonal of one key chunk
    delta = jnp.einsum("bkrd,bkrd->bkr", dout, out)

    def outer(j, grads):
        dq, dk, dv = grads
        k_j = jax.lax.dynamic_slice_in_dim(k_bksd, j * tk, tk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v_bksd, j * tk, tk, axis=2)
        seg_k = None if seg_bt is None else jax.lax.dynamic_slice_in_dim(seg_bt, j * tk, tk, 1)

        def inner(i, carry, causal):
            dq, dk_j, dv_j = carry
            q_i = jax.lax.dynamic_slice_in_dim(q_bkrd, i * r, r, axis=2)
            do_i = jax.lax.dynamic_slice_in_dim(dout, i * r, r, axis=2)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * r, r, axis=2)
            dl_i = jax.lax.dynamic_slice_in_dim(delta, i * r, r, axis=2)
            s = _scores(q_i, k_j)
            seg_q = None if seg_bt is None else jax.lax.dynamic_slice_in_dim(seg_bt, i * tq, tq, 1)
            mask = _mask(i, j, tq, tk, g, seg_q, seg_k, causal)
            p = jnp.exp(s - lse_i[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv_j = dv_j + jnp.einsum("bkrs,bkrd->bksd", p, do_i)
            dp = jnp.einsum("bkrd,bksd->bkrs", do_i, v_j)
            ds = p * (dp - dl_i[..., None])
            dk_j = dk_j + jnp.einsum("bkrs,bkrd->bksd", ds, q_i)
            dq_i = jax.lax.dynamic_slice_in_dim(dq, i * r, r, axis=2)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, dq_i + jnp.einsum("bkrs,bksd->bkrd", ds, k_j), i * r, axis=2)
            return dq, dk_j, dv_j

        carry = (dq, jnp.zeros((b, kv, tk, d), jnp.float32), jnp.zeros((b, kv, tk, d), jnp.float32))
        carry = jax.lax.fori_loop(j * per, (j + 1) * per, functools.partial(inner, causal=True),
                                  carry)
        dq, dk_j, dv_j = jax.lax.fori_loop((j + 1) * per, tp // tq,
                                           functools.partial(inner, causal=False), carry)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * tk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * tk, axis=2)
        return dq, dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    return jax.lax.fori_loop(0, nk, outer, (zeros(q_bkrd), zeros(k_bksd), zeros(v_bksd)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q_bkrd, k_bksd, v_bksd, seg_bt, tq, tk, g):
    return _forward(q_bkrd, k_bksd, v_bksd, seg_bt, tq, tk, g)[0]


def _attention_fwd(q_bkrd, k_bksd, v_bksd, seg_bt, tq, tk, g):
    out, lse = _forward(q_bkrd, k_bksd, v_bksd, seg_bt, tq, tk, g)
    return out, (q_bkrd, k_bksd, v_bksd, seg_bt, out, lse)


def _attention_bwd(tq, tk, g, res, dout):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, dout.astype(jnp.float32), tq, tk, g)
    dseg = None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


_attention.defvjp(_attention_fwd, _attention_bwd)


def dense_attention_xla(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array,
                        segment_ids_bt: jax.Array | None = None, *, q_chunk: int = 64,
                        k_chunk: int = 512) -> jax.Array:
    """Causal grouped-query attention ``[B, T, N, D]``; query head n uses kv head n // G.

    ``segment_ids_bt [B, T]``: packed documents (0 = padding); a key is visible iff it is at or
    before the query and in the same nonzero segment. Rows that see no key give zeros (as
    :func:`mcpm.model.attention.dense_attention`). Computed in float32 whatever the input dtype;
    the output has the query dtype. ``q_chunk * G`` rows meet ``k_chunk`` keys per tile
    (``k_chunk`` is rounded up to a multiple of ``q_chunk``).
    """
    b, t, n, d = q_btnd.shape
    kv = k_btkd.shape[2]
    g = n // kv
    tq, tk, tp = _tiles(t, q_chunk, k_chunk)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q = jnp.pad(q_btnd.astype(jnp.float32) / math.sqrt(d), pad)
    q = q.reshape(b, tp, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, tp * g, d)
    k = jnp.pad(k_btkd.astype(jnp.float32), pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v_btkd.astype(jnp.float32), pad).transpose(0, 2, 1, 3)
    seg = None
    if segment_ids_bt is not None:
        seg = jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))
    out = _attention(q, k, v, seg, tq, tk, g)                          # [B, K, Tp*G, D]
    out = out.reshape(b, kv, tp, g, d).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, d)[:, :t]
    return out.astype(q_btnd.dtype)


def cached_dense_attention_xla(q_btnd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                               q_segment_ids_bt: jax.Array, k_segment_ids_bs: jax.Array,
                               q_start, *, q_chunk: int = 64, k_chunk: int = 512) -> jax.Array:
    """Forward only: T queries at slots ``q_start ..`` over the S slots of a head-major KV cache
    ``[B, K, S, D]`` (a prefill), in tiles with an online softmax, never a ``[T, S]`` array.

    A key slot s is visible to the query in slot q iff ``s <= q``, the segment ids are equal and
    nonzero (0 = empty or padding slot). ``q_start`` may be traced; each query chunk visits only
    the key chunks up to its last slot. Keys and values are read in their dtype and converted
    chunk by chunk (no float32 copy of the cache). Rows that see no key give zeros.
    """
    b, t, n, d = q_btnd.shape
    kv, s_len = k_bksd.shape[1], k_bksd.shape[2]
    g = n // kv
    tq = min(q_chunk, _round_up(t, 8))
    tp = _round_up(t, tq)
    tk = min(k_chunk, s_len)
    nk = -(-s_len // tk)
    r = tq * g
    q = jnp.pad(q_btnd.astype(jnp.float32) / math.sqrt(d), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q = q.reshape(b, tp, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, tp * g, d)
    seg_q = jnp.pad(q_segment_ids_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))
    seg_k = k_segment_ids_bs.astype(jnp.int32)
    q_start = jnp.asarray(q_start, jnp.int32)

    def one_q_chunk(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * r, r, axis=2)
        sq = jnp.repeat(jax.lax.dynamic_slice_in_dim(seg_q, i * tq, tq, 1), g, axis=1)  # [B, R]
        qpos = q_start + i * tq + jnp.arange(r) // g
        last = jnp.minimum((q_start + (i + 1) * tq - 1) // tk, nk - 1)

        def step(j, carry):
            # the last chunk is clamped inside the cache; keys an earlier chunk had are masked
            k0 = jnp.minimum(j * tk, s_len - tk)
            kpos = k0 + jnp.arange(tk)
            sk = jax.lax.dynamic_slice_in_dim(seg_k, k0, tk, 1)
            k_j = jax.lax.dynamic_slice_in_dim(k_bksd, k0, tk, axis=2).astype(jnp.float32)
            v_j = jax.lax.dynamic_slice_in_dim(v_bksd, k0, tk, axis=2).astype(jnp.float32)
            visible = (kpos[None, :] <= qpos[:, None]) & (kpos >= j * tk)[None, :]
            same = (sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] != 0)
            s = jnp.where((visible[None] & same)[:, None], _scores(q_i, k_j), -jnp.inf)
            return _online_update(carry, s, v_j)

        carry = jax.lax.fori_loop(0, last + 1, step, _online_init(b, kv, r, d))
        return _online_finish(*carry)[0]

    out = jax.lax.map(one_q_chunk, jnp.arange(tp // tq))              # [nq, B, K, R, D]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, kv, tp, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, tp, n, d)[:, :t].astype(q_btnd.dtype)
