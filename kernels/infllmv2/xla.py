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

import functools
import math

import jax
import jax.numpy as jnp

from mcpm_kernels.infllmv2.reference import (attention_reference, block_scores, kernel_scores,
                                             scoring_inputs, select_block_lists_from_scores)


_NEG = -1e30  # finite "minus infinity" for running maxima: no inf - inf in rows that see nothing


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


# --------------------------------------------------------------------------------------------
# Stage 1 in tiles (what attention_xla runs): same lists as select_block_lists
# --------------------------------------------------------------------------------------------

def select_block_lists_tiled(q_btnd: jax.Array, k_btkd: jax.Array, cfg, chunk: int = 64,
                             kernel_tile: int = 512,
                             k_for_scoring_btkd: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """:func:`select_block_lists` (same ``idx, valid``; the softmax normaliser summed in another
    order, so scores may differ in the last bits) with stage 1 in cache-sized tiles.

    Per chunk of ``chunk`` queries (their G heads folded into the rows) two sweeps over tiles of
    ``kernel_tile`` kernels, both stopping at the chunk's last visible kernel (about half the
    scores of a full sweep): the first keeps a running log-sum-exp per row, the second turns the
    tile's scores into probabilities, sums the G heads and max-pools them into block scores
    right away. Only ``[chunk, blocks]`` block scores are kept, never ``[chunk, kernels]``
    probabilities. The LSE approximation (variant B option) runs :func:`select_block_lists`.
    """
    if cfg.lse_approx:
        return select_block_lists(q_btnd, k_btkd, cfg, chunk, k_for_scoring_btkd)
    b, t, n, d = q_btnd.shape
    ks, st, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    per = bs // st                                       # kernels per block (pool width per + 1)
    m = -(-t // bs)
    q, kc_bckd, _ = scoring_inputs(q_btnd, k_btkd, cfg, k_for_scoring_btkd)
    kv = kc_bckd.shape[2]
    g = n // kv
    c = kc_bckd.shape[1]
    # tiles cover kernels 0..c (one past the last: the pool halo of the block after it)
    tc = min(max(per, kernel_tile // per * per), -(-(c + 1) // per) * per)
    n_tiles = -(-(c + 1) // tc)
    mp = max(m, n_tiles * tc // per)                     # block-score buffer width
    kc = _pad_to(kc_bckd, tc * n_tiles).transpose(0, 2, 1, 3)              # [B, K, Cp, D]
    nc = -(-t // chunk)
    q_c = _pad_to(q, chunk).reshape(b, nc, chunk, kv, g, d).transpose(1, 0, 3, 2, 4, 5)
    q_c = q_c.reshape(nc, b, kv, chunk * g, d)
    scale = 1.0 / math.sqrt(d)
    # a block whose kernels are all beyond the sweep: 0 if one of them exists (invisible ones
    # score 0), -inf if none does
    blk = jnp.arange(mp)
    exists = (blk * per - 1 < c) & (blk * per + per - 1 >= 0) & (c > 0)
    beyond = jnp.where(exists, 0.0, -jnp.inf).astype(jnp.float32)

    def one_chunk(args):
        q_brd, start = args
        pos = start + jnp.arange(chunk)
        row_pos = jnp.repeat(pos, g)                                       # [R]
        # kernels visible to the chunk's last query, plus one (the next block's pool halo)
        n_vis = jnp.clip((start + chunk - 1 - ks + 1) // st + 1, 0, c)
        n_sweep = jnp.minimum((n_vis + 1 + tc - 1) // tc, n_tiles)

        def logits(j):
            kc_j = jax.lax.dynamic_slice_in_dim(kc, j * tc, tc, axis=2)
            s = jnp.einsum("bkrd,bkcd->bkrc", q_brd, kc_j) * scale
            kpos = j * tc + jnp.arange(tc)
            visible = (kpos[None, :] * st + ks - 1 <= row_pos[:, None]) & (kpos[None, :] < c)
            return s, visible

        def lse_step(j, carry):
            mx, sm = carry
            s, visible = logits(j)
            s = jnp.where(visible, s, -jnp.inf)
            mx_new = jnp.maximum(mx, s.max(axis=-1))
            sm = sm * jnp.exp(mx - mx_new) + jnp.exp(s - mx_new[..., None]).sum(axis=-1)
            return mx_new, sm

        rows = chunk * g
        mx, sm = jax.lax.fori_loop(0, n_sweep, lse_step,
                                   (jnp.full((b, kv, rows), _NEG, jnp.float32),
                                    jnp.zeros((b, kv, rows), jnp.float32)))
        lse = mx + jnp.log(jnp.where(sm > 0, sm, 1.0))

        def score_step(j, carry):
            scores, halo = carry
            s, visible = logits(j)
            prob = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
            grp = prob.reshape(b, kv, chunk, g, tc).sum(axis=3)            # [B, K, chunk, tc]
            kpos = j * tc + jnp.arange(tc)
            grp = jnp.where(kpos < c, grp, -jnp.inf)                       # no such kernel
            ext = jnp.concatenate([halo[..., None], grp], axis=-1)         # kernels j*tc-1 ...
            pooled = jnp.maximum(ext[..., :tc].reshape(b, kv, chunk, tc // per, per).max(-1),
                                 ext[..., per::per])
            scores = jax.lax.dynamic_update_slice_in_dim(scores, pooled, j * (tc // per), axis=3)
            return scores, grp[..., -1]

        init = jnp.broadcast_to(beyond, (b, kv, chunk, mp))
        scores, _ = jax.lax.fori_loop(0, n_sweep, score_step,
                                      (init, jnp.full((b, kv, chunk), -jnp.inf, jnp.float32)))
        return select_block_lists_from_scores(scores[..., :m], pos, cfg)

    starts = jnp.arange(nc) * chunk
    idx, valid = jax.lax.map(one_chunk, (q_c, starts))                    # [nc, B, K, chunk, P]
    p = idx.shape[-1]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, kv, nc * chunk, p)[:, :, :t]
    valid = valid.transpose(1, 2, 0, 3, 4).reshape(b, kv, nc * chunk, p)[:, :, :t]
    return idx, valid


# --------------------------------------------------------------------------------------------
# Stage 2: window blocks as one dense tile per query block, the rest gathered per query
# --------------------------------------------------------------------------------------------

def _window_tile(q_bkrd, k_pad, v_pad, seg_q, seg_pad, qb, bs, w, g):
    """Scores of query block qb's rows (bs queries x G heads) against the keys of blocks
    qb-w+1 .. qb (``k_pad``: keys front-padded by (w-1)*bs), and the mask ``[B, 1, R, w*bs]``."""
    wk = w * bs
    k = jax.lax.dynamic_slice_in_dim(k_pad, qb * bs, wk, axis=2)
    v = jax.lax.dynamic_slice_in_dim(v_pad, qb * bs, wk, axis=2)
    s = jnp.einsum("bkrd,bksd->bkrs", q_bkrd, k, preferred_element_type=jnp.float32)
    qpos = qb * bs + jnp.arange(bs * g) // g
    kpos = (qb - w + 1) * bs + jnp.arange(wk)
    mask = ((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0))[None, None]
    if seg_q is not None:
        sk = jax.lax.dynamic_slice_in_dim(seg_pad, qb * bs, wk, axis=1)
        sq = jnp.repeat(seg_q, g, axis=1)
        mask = mask & ((sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] != 0))[:, None]
    return k, v, s, mask


def _gather_tile(q_c, k_blk, v_blk, idx_c, ok_c, seg_q, seg_blk, start, causal):
    """Each query's own blocks: keys/values ``[B, K, cq, S, D]`` (S = P * bs), scores
    ``[B, K, cq, S, G]`` (keys before heads: the faster layout for G-row products on XLA:CPU)
    and the mask ``[B, K, cq, S, 1]``."""
    b, kv, cq, g, d = q_c.shape
    p = idx_c.shape[-1]
    bs = k_blk.shape[3]
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(kv)[None, :, None, None]
    kg = k_blk[bi, hi, idx_c].reshape(b, kv, cq, p * bs, d)
    vg = v_blk[bi, hi, idx_c].reshape(b, kv, cq, p * bs, d)
    s = jnp.einsum("bkqsd,bkqgd->bkqsg", kg, q_c, preferred_element_type=jnp.float32)
    mask = jnp.broadcast_to(ok_c[..., None], ok_c.shape + (bs,))
    if causal:
        kpos = idx_c[..., None] * bs + jnp.arange(bs)
        mask = mask & (kpos <= (start + jnp.arange(cq))[None, None, :, None, None])
    if seg_q is not None:
        key_seg = seg_blk[bi, idx_c]                                       # [B, K, cq, P, bs]
        mask = mask & (key_seg == seg_q[:, None, :, None, None]) & (key_seg != 0)
    return kg, vg, s, mask.reshape(b, kv, cq, p * bs, 1)


def _prepare(k, v, seg, bs, w):
    front = (w - 1) * bs
    pad_front = lambda x, axis: jnp.pad(x, [(front, 0) if a == axis else (0, 0)
                                            for a in range(x.ndim)])
    b, kv, tp, d = k.shape
    return dict(k_pad=pad_front(k, 2), v_pad=pad_front(v, 2),
                seg_pad=None if seg is None else pad_front(seg, 1),
                k_blk=k.reshape(b, kv, tp // bs, bs, d), v_blk=v.reshape(b, kv, tp // bs, bs, d),
                seg_blk=None if seg is None else seg.reshape(b, tp // bs, bs))


def _sparse_forward(q, k, v, idx, ok, seg, bs, w, cq, causal):
    """q ``[B, K, Tp, G, D]`` (scaled), k/v ``[B, K, Tp, D]``; w = 0: no window part.
    Returns out ``[B, K, Tp, G, D]`` and lse ``[B, K, Tp, G]`` (+inf for rows that see nothing)."""
    b, kv, tp, g, d = q.shape
    arrays = _prepare(k, v, seg, bs, max(w, 1))
    sl = jax.lax.dynamic_slice_in_dim

    def gathered(i):
        q_c = sl(q, i * cq, cq, 2)
        seg_q = None if seg is None else sl(seg, i * cq, cq, 1)
        kg, vg, s, mask = _gather_tile(q_c, arrays["k_blk"], arrays["v_blk"], sl(idx, i * cq, cq, 2),
                                       sl(ok, i * cq, cq, 2), seg_q, arrays["seg_blk"], i * cq,
                                       causal)
        s = jnp.where(mask, s, -jnp.inf)
        mx = jnp.maximum(s.max(axis=-2), _NEG)                             # [B, K, cq, G]
        prob = jnp.exp(s - mx[..., None, :])
        return mx, prob.sum(axis=-2), jnp.einsum("bkqsg,bkqsd->bkqgd", prob, vg)

    mx, sm, acc = jax.lax.map(gathered, jnp.arange(tp // cq))
    mx = mx.transpose(1, 2, 0, 3, 4).reshape(b, kv, tp, g)
    sm = sm.transpose(1, 2, 0, 3, 4).reshape(b, kv, tp, g)
    acc = acc.transpose(1, 2, 0, 3, 4, 5).reshape(b, kv, tp, g, d)
    if w:
        def window(qb):
            q_r = sl(q, qb * bs, bs, 2).reshape(b, kv, bs * g, d)
            seg_q = None if seg is None else sl(seg, qb * bs, bs, 1)
            _, v_w, s, mask = _window_tile(q_r, arrays["k_pad"], arrays["v_pad"], seg_q,
                                           arrays["seg_pad"], qb, bs, w, g)
            s = jnp.where(mask, s, -jnp.inf)
            mx = jnp.maximum(s.max(axis=-1), _NEG)
            prob = jnp.exp(s - mx[..., None])
            return mx, prob.sum(axis=-1), jnp.einsum("bkrs,bksd->bkrd", prob, v_w)

        mx_w, sm_w, acc_w = jax.lax.map(window, jnp.arange(tp // bs))     # [nqb, B, K, R, (D)]
        mx_w = mx_w.transpose(1, 2, 0, 3).reshape(b, kv, tp, g)
        sm_w = sm_w.transpose(1, 2, 0, 3).reshape(b, kv, tp, g)
        acc_w = acc_w.transpose(1, 2, 0, 3, 4).reshape(b, kv, tp, g, d)
        # merge the two parts by log-sum-exp
        mx_all = jnp.maximum(mx, mx_w)
        a, a_w = jnp.exp(mx - mx_all), jnp.exp(mx_w - mx_all)
        sm = sm * a + sm_w * a_w
        acc = acc * a[..., None] + acc_w * a_w[..., None]
        mx = mx_all
    safe = jnp.where(sm > 0, sm, 1.0)
    return acc / safe[..., None], jnp.where(sm > 0, mx + jnp.log(safe), jnp.inf)


def _sparse_backward(q, k, v, idx, ok, seg, out, lse, dout, bs, w, cq, causal):
    b, kv, tp, g, d = q.shape
    arrays = _prepare(k, v, seg, bs, max(w, 1))
    sl = jax.lax.dynamic_slice_in_dim
    delta = jnp.einsum("bktgd,bktgd->bktg", dout, out)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(kv)[None, :, None, None]

    def gathered(carry, i):
        dk_blk, dv_blk = carry
        q_c, do_c = sl(q, i * cq, cq, 2), sl(dout, i * cq, cq, 2)
        idx_c = sl(idx, i * cq, cq, 2)
        seg_q = None if seg is None else sl(seg, i * cq, cq, 1)
        kg, vg, s, mask = _gather_tile(q_c, arrays["k_blk"], arrays["v_blk"], idx_c,
                                       sl(ok, i * cq, cq, 2), seg_q, arrays["seg_blk"], i * cq,
                                       causal)
        prob = jnp.where(mask, jnp.exp(s - sl(lse, i * cq, cq, 2)[..., None, :]), 0.0)
        dv_g = jnp.einsum("bkqsg,bkqgd->bkqsd", prob, do_c)
        dp = jnp.einsum("bkqgd,bkqsd->bkqsg", do_c, vg)
        ds = prob * (dp - sl(delta, i * cq, cq, 2)[..., None, :])
        dq_c = jnp.einsum("bkqsg,bkqsd->bkqgd", ds, kg)
        dk_g = jnp.einsum("bkqsg,bkqgd->bkqsd", ds, q_c)
        shape = idx_c.shape + (bs, d)
        dk_blk = dk_blk.at[bi, hi, idx_c].add(dk_g.reshape(shape))
        dv_blk = dv_blk.at[bi, hi, idx_c].add(dv_g.reshape(shape))
        return (dk_blk, dv_blk), dq_c

    zeros_blk = jnp.zeros(arrays["k_blk"].shape, jnp.float32)
    (dk_blk, dv_blk), dq = jax.lax.scan(gathered, (zeros_blk, zeros_blk), jnp.arange(tp // cq))
    dq = dq.transpose(1, 2, 0, 3, 4, 5).reshape(b, kv, tp, g, d)
    dk = dk_blk.reshape(b, kv, tp, d)
    dv = dv_blk.reshape(b, kv, tp, d)
    if w:
        def window(carry, qb):
            dk_pad, dv_pad = carry
            rows = bs * g
            q_r = sl(q, qb * bs, bs, 2).reshape(b, kv, rows, d)
            do_r = sl(dout, qb * bs, bs, 2).reshape(b, kv, rows, d)
            lse_r = sl(lse, qb * bs, bs, 2).reshape(b, kv, rows)
            dl_r = sl(delta, qb * bs, bs, 2).reshape(b, kv, rows)
            seg_q = None if seg is None else sl(seg, qb * bs, bs, 1)
            k_w, v_w, s, mask = _window_tile(q_r, arrays["k_pad"], arrays["v_pad"], seg_q,
                                             arrays["seg_pad"], qb, bs, w, g)
            prob = jnp.where(mask, jnp.exp(s - lse_r[..., None]), 0.0)
            dv_w = jnp.einsum("bkrs,bkrd->bksd", prob, do_r)
            dp = jnp.einsum("bkrd,bksd->bkrs", do_r, v_w)
            ds = prob * (dp - dl_r[..., None])
            dq_r = jnp.einsum("bkrs,bksd->bkrd", ds, k_w)
            dk_w = jnp.einsum("bkrs,bkrd->bksd", ds, q_r)
            wk = w * bs
            dk_pad = jax.lax.dynamic_update_slice_in_dim(
                dk_pad, sl(dk_pad, qb * bs, wk, 2) + dk_w, qb * bs, axis=2)
            dv_pad = jax.lax.dynamic_update_slice_in_dim(
                dv_pad, sl(dv_pad, qb * bs, wk, 2) + dv_w, qb * bs, axis=2)
            return (dk_pad, dv_pad), dq_r.reshape(b, kv, bs, g, d)

        zeros_pad = jnp.zeros(arrays["k_pad"].shape, jnp.float32)
        (dk_pad, dv_pad), dq_w = jax.lax.scan(window, (zeros_pad, zeros_pad),
                                              jnp.arange(tp // bs))
        dq = dq + dq_w.transpose(1, 2, 0, 3, 4, 5).reshape(b, kv, tp, g, d)
        dk = dk + dk_pad[:, :, (w - 1) * bs:]
        dv = dv + dv_pad[:, :, (w - 1) * bs:]
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sparse(q, k, v, idx, ok, seg, bs, w, cq, causal):
    return _sparse_forward(q, k, v, idx, ok, seg, bs, w, cq, causal)[0]


def _sparse_fwd(q, k, v, idx, ok, seg, bs, w, cq, causal):
    out, lse = _sparse_forward(q, k, v, idx, ok, seg, bs, w, cq, causal)
    return out, (q, k, v, idx, ok, seg, out, lse)


def _sparse_bwd(bs, w, cq, causal, res, dout):
    q, k, v, idx, ok, seg, out, lse = res
    dq, dk, dv = _sparse_backward(q, k, v, idx, ok, seg, out, lse, dout.astype(jnp.float32),
                                  bs, w, cq, causal)
    return dq, dk, dv, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def attention_xla(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, cfg,
                  segment_ids_bt: jax.Array | None = None, chunk: int = 16,
                  select_chunk: int = 64, k_for_scoring_btkd: jax.Array | None = None
                  ) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]``; memory linear in T. ``chunk``: queries per gathered
    tile; ``select_chunk``: queries per stage-1 tile. ``k_for_scoring_btkd``: the pre-RoPE keys
    when ``use_nope``.

    Stage 1 is :func:`select_block_lists_tiled`. Stage 2 computes, in float32 with a custom VJP
    (the backward recomputes scores tile by tile from the saved row log-sum-exp):

    * variant A: the W window blocks, identical for all queries of a query block, as one dense
      tile per query block (``block_size * G`` rows against ``W * block_size`` keys, causal in
      the last block), and the top-k blocks gathered per query (``chunk`` queries per tile, no
      causal mask needed: they lie before the window); the two merged by log-sum-exp;
    * variant B: all ``topk`` blocks gathered per query, causal mask on the query's own block.
    """
    b, t, n, d = q_btnd.shape
    kv = k_btkd.shape[2]
    g = n // kv
    bs = cfg.block_size
    if cfg.dense_len != -1 and t < cfg.dense_len:
        return attention_reference(q_btnd, k_btkd, v_btkd, cfg, segment_ids_bt)
    idx, valid = select_block_lists_tiled(q_btnd, k_btkd, cfg, select_chunk,
                                          k_for_scoring_btkd=k_for_scoring_btkd)
    w = 0 if cfg.variant == "B" else cfg.window_size // bs
    if w:                                      # the last W slots are the window: done densely
        idx, valid = idx[..., :-w], valid[..., :-w]
    cq = max(c for c in range(1, min(chunk, bs) + 1) if bs % c == 0)
    tp = -(-t // bs) * bs
    q = _pad_to(q_btnd.astype(jnp.float32) / math.sqrt(d), bs)
    q = q.reshape(b, tp, kv, g, d).transpose(0, 2, 1, 3, 4)                # [B, K, Tp, G, D]
    k = _pad_to(k_btkd.astype(jnp.float32), bs).transpose(0, 2, 1, 3)      # [B, K, Tp, D]
    v = _pad_to(v_btkd.astype(jnp.float32), bs).transpose(0, 2, 1, 3)
    idx, valid = _pad_to(idx, bs, axis=2), _pad_to(valid, bs, axis=2)
    seg = None if segment_ids_bt is None else _pad_to(segment_ids_bt.astype(jnp.int32), bs)
    out = _sparse(q, k, v, idx, valid, seg, bs, w, cq, cfg.variant == "B")
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, tp, n, d)[:, :t]
    return out.astype(q_btnd.dtype)
