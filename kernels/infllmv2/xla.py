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
import numpy as np

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

    Per chunk of ``chunk`` queries (their G heads folded into the rows), one sweep of matmuls
    over tiles of ``kernel_tile`` kernels that stops at the chunk's last visible kernel (about
    half the scores of a full sweep) keeps a running max and sum per row and stores each tile's
    ``exp(score - running max)``; a second sweep over the stored tiles rescales them into
    probabilities, sums the G heads and max-pools them into block scores. The store is one
    chunk's ``[chunk * G, kernels]`` float32 buffer, reused by every chunk. The LSE
    approximation (variant B option) runs :func:`select_block_lists`.
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

    rows = chunk * g

    def one_chunk(carry, args):
        buf, tile_max = carry           # [B, K, R, Cp] exp'd scores, [B, K, n_tiles, R] maxima
        q_brd, start = args
        pos = start + jnp.arange(chunk)
        row_pos = jnp.repeat(pos, g)                                       # [R]
        # kernels visible to the chunk's last query, plus one (the next block's pool halo)
        n_vis = jnp.clip((start + chunk - 1 - ks + 1) // st + 1, 0, c)
        n_sweep = jnp.minimum((n_vis + 1 + tc - 1) // tc, n_tiles)

        def lse_step(j, carry):
            mx, sm, buf, tile_max = carry
            kc_j = jax.lax.dynamic_slice_in_dim(kc, j * tc, tc, axis=2)
            s = jnp.einsum("bkrd,bkcd->bkrc", q_brd, kc_j) * scale
            kpos = j * tc + jnp.arange(tc)
            visible = (kpos[None, :] * st + ks - 1 <= row_pos[:, None]) & (kpos[None, :] < c)
            s = jnp.where(visible, s, -jnp.inf)
            mx_new = jnp.maximum(mx, s.max(axis=-1))
            e = jnp.exp(s - mx_new[..., None])                # 0 where invisible
            sm = sm * jnp.exp(mx - mx_new) + e.sum(axis=-1)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, e, j * tc, axis=3)
            tile_max = jax.lax.dynamic_update_slice_in_dim(tile_max, mx_new[:, :, None], j, axis=2)
            return mx_new, sm, buf, tile_max

        mx, sm, buf, tile_max = jax.lax.fori_loop(
            0, n_sweep, lse_step, (jnp.full((b, kv, rows), _NEG, jnp.float32),
                                   jnp.zeros((b, kv, rows), jnp.float32), buf, tile_max))
        lse = mx + jnp.log(jnp.where(sm > 0, sm, 1.0))

        def score_step(j, carry):
            scores, halo = carry
            # exp(s - lse) = exp(s - tile max) * exp(tile max - lse): no second matmul or exp
            factor = jnp.exp(jax.lax.dynamic_index_in_dim(tile_max, j, 2, keepdims=False) - lse)
            prob = jax.lax.dynamic_slice_in_dim(buf, j * tc, tc, axis=3) * factor[..., None]
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
        return (buf, tile_max), select_block_lists_from_scores(scores[..., :m], pos, cfg)

    starts = jnp.arange(nc) * chunk
    # the buffers are carried from chunk to chunk: each chunk reads only the tiles it wrote
    carry = (jnp.zeros((b, kv, rows, n_tiles * tc), jnp.float32),
             jnp.zeros((b, kv, n_tiles, rows), jnp.float32))
    _, (idx, valid) = jax.lax.scan(one_chunk, carry, (q_c, starts))      # [nc, B, K, chunk, P]
    p = idx.shape[-1]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, kv, nc * chunk, p)[:, :, :t]
    valid = valid.transpose(1, 2, 0, 3, 4).reshape(b, kv, nc * chunk, p)[:, :, :t]
    return idx, valid


# --------------------------------------------------------------------------------------------
# Stage 2: window blocks as one dense tile per query block, the chosen blocks block by block
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


def _block_groups(idx, ok, bs, group, n_groups):
    """Invert the per-query lists: for every key block, the queries that chose it, in groups of
    ``group`` queries of one block. Returns ``rows [B, K, NG, group]`` (query position; slot r of
    a group that is not filled points at the spare row Tp + r) and ``blocks [B, K, NG]``.

    idx, ok: ``[B, K, Tp, P]``. A block's queries fill ceil(count / group) groups; ``n_groups``
    (static) bounds the total over all blocks."""
    b, kv, tp, p = idx.shape
    mb = tp // bs

    def one(idx_tp, ok_tp):
        key = jnp.where(ok_tp, idx_tp, mb).reshape(-1)                    # invalid: sort last
        order = jnp.argsort(key, stable=True)
        skey = key[order]
        query = (order // p).astype(jnp.int32)
        counts = jnp.zeros((mb + 1,), jnp.int32).at[key].add(1)[:mb]
        first = jnp.cumsum(counts) - counts                               # in sorted order
        padded = -(-counts // group) * group
        gfirst = jnp.cumsum(padded) - padded                              # in group slots
        blk = jnp.minimum(skey, mb - 1)
        dest = jnp.where(skey < mb, gfirst[blk] + jnp.arange(key.shape[0]) - first[blk],
                         n_groups * group)                                # out of range: dropped
        spare = tp + jnp.arange(n_groups * group, dtype=jnp.int32) % group
        rows = spare.at[dest].set(query, mode="drop")
        blocks = jnp.zeros((n_groups,), jnp.int32).at[dest // group].set(blk, mode="drop")
        return rows.reshape(n_groups, group), blocks

    return jax.vmap(jax.vmap(one))(idx, ok)


def _group_tile(q_rows, k_b, seg_rows, seg_b, rows, blocks, tp, bs, causal):
    """Scores of a group's rows ``[B, K, L, G, bs]`` against its block, and the mask
    ``[B, K, L, 1, bs]`` (spare rows see nothing)."""
    s = jnp.einsum("bklgd,bksd->bklgs", q_rows, k_b, preferred_element_type=jnp.float32)
    mask = (rows < tp)[..., None]
    if causal:
        kpos = blocks[..., None, None] * bs + jnp.arange(bs)
        mask = mask & (kpos <= rows[..., None])
    if seg_rows is not None:
        mask = mask & (seg_rows[..., None] == seg_b[:, :, None, :]) & (seg_b[:, :, None, :] != 0)
    return s, mask[:, :, :, None, :]


def _prepare(q, k, v, seg, bs, w, group):
    """Padded views shared by the forward and backward: keys/values front-padded by (w-1)*bs
    for the window tiles, as blocks for the groups; q and seg with ``group`` spare rows."""
    front = (w - 1) * bs
    pad = lambda x, axis, before, after: jnp.pad(
        x, [(before, after) if a == axis else (0, 0) for a in range(x.ndim)])
    b, kv, tp, d = k.shape
    return dict(k_pad=pad(k, 2, front, 0), v_pad=pad(v, 2, front, 0),
                seg_pad=None if seg is None else pad(seg, 1, front, 0),
                k_blk=k.reshape(b, kv, tp // bs, bs, d), v_blk=v.reshape(b, kv, tp // bs, bs, d),
                seg_blk=None if seg is None else seg.reshape(b, tp // bs, bs),
                q_ext=pad(q, 2, 0, group), seg_ext=None if seg is None else pad(seg, 1, 0, group))


def _gather_rows(x, bi, hi, rows):
    return x[bi, hi, rows]


def _with_spare_rows(x, group):
    """x ``[B, K, Tp, ...]`` with ``group`` zero rows appended (the targets of unfilled slots)."""
    return jnp.pad(x, [(0, group) if ax == 2 else (0, 0) for ax in range(x.ndim)])


def _group_operands(a, seg, bi, hi, r, blk):
    """A group's key block, value block, its rows' segments and the block's segments."""
    k_b = a["k_blk"][bi[..., 0], hi[..., 0], blk]                         # [B, K, bs, D]
    v_b = a["v_blk"][bi[..., 0], hi[..., 0], blk]
    seg_r = None if seg is None else a["seg_ext"][bi, r]
    seg_b = None if seg is None else a["seg_blk"][bi[..., 0], blk]
    return k_b, v_b, seg_r, seg_b


def _sparse_forward(q, k, v, rows, blocks, seg, bs, w, causal):
    """q ``[B, K, Tp, G, D]`` (scaled), k/v ``[B, K, Tp, D]``, groups from :func:`_block_groups`;
    w = 0: no window part. Returns out ``[B, K, Tp, G, D]`` and lse ``[B, K, Tp, G]`` (+inf for
    rows that see nothing)."""
    b, kv, tp, g, d = q.shape
    group = rows.shape[-1]
    a = _prepare(q, k, v, seg, bs, max(w, 1), group)
    sl = jax.lax.dynamic_slice_in_dim
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kv)[None, :, None]
    if w:
        def window(qb):
            q_r = sl(q, qb * bs, bs, 2).reshape(b, kv, bs * g, d)
            seg_q = None if seg is None else sl(seg, qb * bs, bs, 1)
            _, v_w, s, mask = _window_tile(q_r, a["k_pad"], a["v_pad"], seg_q, a["seg_pad"], qb,
                                           bs, w, g)
            s = jnp.where(mask, s, -jnp.inf)
            mx = jnp.maximum(s.max(axis=-1), _NEG)
            prob = jnp.exp(s - mx[..., None])
            return mx, prob.sum(axis=-1), jnp.einsum("bkrs,bksd->bkrd", prob, v_w)

        mx, sm, acc = jax.lax.map(window, jnp.arange(tp // bs))           # [nqb, B, K, R, (D)]
        mx = mx.transpose(1, 2, 0, 3).reshape(b, kv, tp, g)
        sm = sm.transpose(1, 2, 0, 3).reshape(b, kv, tp, g)
        acc = acc.transpose(1, 2, 0, 3, 4).reshape(b, kv, tp, g, d)
    else:
        mx = jnp.full((b, kv, tp, g), _NEG, jnp.float32)
        sm = jnp.zeros((b, kv, tp, g), jnp.float32)
        acc = jnp.zeros((b, kv, tp, g, d), jnp.float32)
    # the groups continue each row's online softmax: gather its state, update, scatter it back
    # (a query appears at most once in a group, so the scatter never collides)
    state = tuple(_with_spare_rows(x, group) for x in (mx, sm, acc))

    def one_group(state, gi):
        r = rows[:, :, gi]                                                # [B, K, L]
        blk = blocks[:, :, gi]                                            # [B, K]
        k_b, v_b, seg_r, seg_b = _group_operands(a, seg, bi, hi, r, blk)
        s, mask = _group_tile(_gather_rows(a["q_ext"], bi, hi, r), k_b, seg_r, seg_b, r, blk, tp,
                              bs, causal)
        mx_r, sm_r, acc_r = (_gather_rows(x, bi, hi, r) for x in state)
        s = jnp.where(mask, s, -jnp.inf)
        mx_new = jnp.maximum(mx_r, s.max(axis=-1))
        prob = jnp.exp(s - mx_new[..., None])
        alpha = jnp.exp(mx_r - mx_new)
        sm_r = sm_r * alpha + prob.sum(axis=-1)
        acc_r = acc_r * alpha[..., None] + jnp.einsum("bklgs,bksd->bklgd", prob, v_b)
        state = tuple(x.at[bi, hi, r].set(y, unique_indices=True)
                      for x, y in zip(state, (mx_new, sm_r, acc_r)))
        return state, None

    (mx, sm, acc), _ = jax.lax.scan(one_group, state, jnp.arange(rows.shape[2]))
    mx, sm, acc = mx[:, :, :tp], sm[:, :, :tp], acc[:, :, :tp]
    safe = jnp.where(sm > 0, sm, 1.0)
    return acc / safe[..., None], jnp.where(sm > 0, mx + jnp.log(safe), jnp.inf)


def _sparse_backward(q, k, v, rows, blocks, seg, out, lse, dout, bs, w, causal):
    b, kv, tp, g, d = q.shape
    group = rows.shape[-1]
    a = _prepare(q, k, v, seg, bs, max(w, 1), group)
    sl = jax.lax.dynamic_slice_in_dim
    delta = jnp.einsum("bktgd,bktgd->bktg", dout, out)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kv)[None, :, None]
    do_ext, lse_ext, delta_ext = (_with_spare_rows(x, group) for x in (dout, lse, delta))

    def one_group(carry, gi):
        dq, dk_blk, dv_blk = carry
        r = rows[:, :, gi]
        blk = blocks[:, :, gi]
        k_b, v_b, seg_r, seg_b = _group_operands(a, seg, bi, hi, r, blk)
        q_r = _gather_rows(a["q_ext"], bi, hi, r)                         # [B, K, L, G, D]
        do_r = _gather_rows(do_ext, bi, hi, r)
        s, mask = _group_tile(q_r, k_b, seg_r, seg_b, r, blk, tp, bs, causal)
        prob = jnp.where(mask, jnp.exp(s - _gather_rows(lse_ext, bi, hi, r)[..., None]), 0.0)
        dp = jnp.einsum("bklgd,bksd->bklgs", do_r, v_b)
        ds = prob * (dp - _gather_rows(delta_ext, bi, hi, r)[..., None])
        dq = dq.at[bi, hi, r].add(jnp.einsum("bklgs,bksd->bklgd", ds, k_b), unique_indices=True)
        dk_blk = dk_blk.at[bi[..., 0], hi[..., 0], blk].add(
            jnp.einsum("bklgs,bklgd->bksd", ds, q_r))
        dv_blk = dv_blk.at[bi[..., 0], hi[..., 0], blk].add(
            jnp.einsum("bklgs,bklgd->bksd", prob, do_r))
        return (dq, dk_blk, dv_blk), None

    zeros_blk = jnp.zeros(a["k_blk"].shape, jnp.float32)
    (dq, dk_blk, dv_blk), _ = jax.lax.scan(
        one_group, (jnp.zeros(a["q_ext"].shape, jnp.float32), zeros_blk, zeros_blk),
        jnp.arange(rows.shape[2]))
    dq = dq[:, :, :tp]
    dk = dk_blk.reshape(b, kv, tp, d)
    dv = dv_blk.reshape(b, kv, tp, d)
    if w:
        def window(carry, qb):
            dk_pad, dv_pad = carry
            nr = bs * g
            q_r = sl(q, qb * bs, bs, 2).reshape(b, kv, nr, d)
            do_r = sl(dout, qb * bs, bs, 2).reshape(b, kv, nr, d)
            lse_r = sl(lse, qb * bs, bs, 2).reshape(b, kv, nr)
            dl_r = sl(delta, qb * bs, bs, 2).reshape(b, kv, nr)
            seg_q = None if seg is None else sl(seg, qb * bs, bs, 1)
            k_w, v_w, s, mask = _window_tile(q_r, a["k_pad"], a["v_pad"], seg_q, a["seg_pad"],
                                             qb, bs, w, g)
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

        zeros_pad = jnp.zeros(a["k_pad"].shape, jnp.float32)
        (dk_pad, dv_pad), dq_w = jax.lax.scan(window, (zeros_pad, zeros_pad),
                                              jnp.arange(tp // bs))
        dq = dq + dq_w.transpose(1, 2, 0, 3, 4, 5).reshape(b, kv, tp, g, d)
        dk = dk + dk_pad[:, :, (w - 1) * bs:]
        dv = dv + dv_pad[:, :, (w - 1) * bs:]
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _sparse(q, k, v, rows, blocks, seg, bs, w, causal):
    return _sparse_forward(q, k, v, rows, blocks, seg, bs, w, causal)[0]


def _sparse_fwd(q, k, v, rows, blocks, seg, bs, w, causal):
    out, lse = _sparse_forward(q, k, v, rows, blocks, seg, bs, w, causal)
    return out, (q, k, v, rows, blocks, seg, out, lse)


def _sparse_bwd(bs, w, causal, res, dout):
    q, k, v, rows, blocks, seg, out, lse = res
    dq, dk, dv = _sparse_backward(q, k, v, rows, blocks, seg, out, lse,
                                  dout.astype(jnp.float32), bs, w, causal)
    return dq, dk, dv, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def attention_xla(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, cfg,
                  segment_ids_bt: jax.Array | None = None, chunk: int = 64,
                  select_chunk: int = 64, k_for_scoring_btkd: jax.Array | None = None
                  ) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]``; memory linear in T. ``chunk``: queries per group of
    one key block (below); ``select_chunk``: queries per stage-1 tile. ``k_for_scoring_btkd``:
    the pre-RoPE keys when ``use_nope``.

    Stage 1 is :func:`select_block_lists_tiled`. Stage 2, in float32 with a custom VJP (the
    backward recomputes the scores tile by tile from the saved row log-sum-exp):

    * variant A: the W window blocks, the same for every query of a query block, as one dense
      tile per query block (``block_size * G`` rows against ``W * block_size`` keys, causal
      inside the last block);
    * the chosen blocks (variant A: the top-k ones, all before the window; variant B: all of
      them, causal on the query's own block) block by block: the per-query lists are inverted
      into, for every key block, the queries that chose it, in groups of ``chunk`` queries; a
      group is one ``chunk * G`` rows x ``block_size`` keys tile (its queries' rows gathered,
      8 KB per query and block instead of the block's 64 KB of keys and values) that continues
      those rows' online softmax, started by the window tile.
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
    tp = -(-t // bs) * bs
    q = _pad_to(q_btnd.astype(jnp.float32) / math.sqrt(d), bs)
    q = q.reshape(b, tp, kv, g, d).transpose(0, 2, 1, 3, 4)                # [B, K, Tp, G, D]
    k = _pad_to(k_btkd.astype(jnp.float32), bs).transpose(0, 2, 1, 3)      # [B, K, Tp, D]
    v = _pad_to(v_btkd.astype(jnp.float32), bs).transpose(0, 2, 1, 3)
    idx, valid = _pad_to(idx, bs, axis=2), _pad_to(valid, bs, axis=2)
    # static bound on the valid (query, block) pairs: a query in block qb has at most
    # qb - W + 1 valid top-k blocks in variant A (b <= qb - W), qb + 1 in variant B
    qb = np.arange(t) // bs
    pairs = int(np.minimum(idx.shape[-1], np.maximum(0, qb + 1 - w)).sum())
    n_groups = max(1, -(-pairs // chunk) + tp // bs)
    rows, blocks = _block_groups(idx, valid, bs, chunk, n_groups)
    seg = None if segment_ids_bt is None else _pad_to(segment_ids_bt.astype(jnp.int32), bs)
    out = _sparse(q, k, v, rows, blocks, seg, bs, w, cfg.variant == "B")
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, tp, n, d)[:, :t]
    return out.astype(q_btnd.dtype)
