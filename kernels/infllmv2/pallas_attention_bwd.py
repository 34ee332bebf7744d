"""Backward of the InfLLM v2 Pallas attention: a dQ kernel and a dK/dV kernel.

With ``p = exp(s - lse)`` (s the scaled, masked logits) and ``delta = rowsum(o * do)``:
``dv = p^T do``, ``ds = p * (do v^T - delta)``, ``dq = scale * ds k``, ``dk = scale * ds^T q``.

- dQ: the forward's grid ``(B, K, nT)`` and its double-buffered loop over the tile's union of key
  blocks; dQ accumulates in float32 VMEM scratch and is written once per tile.
- dK/dV: grid ``(B, K, M)``, one step per key block (its K/V block and dK/dV output blocks are
  pipelined by BlockSpecs). The step loops over the query tiles that selected the block: the
  (tile, bit word) pairs of the inverse map, sorted by block, are read from HBM WIN entries at a
  time into SMEM; each tile's q, do (strided ``(tq, G, D)`` slices of the model layout), lse,
  delta (and segment ids) come by double-buffered DMA.
  The logits are computed transposed, ``(bs, R) = k q^T``, so lse/delta are lane rows and all
  four matmuls are plain or ``a @ b.T`` forms. dK/dV accumulate in float32 VMEM scratch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mcpm_kernels.infllmv2.pallas_tables import (NN_DIMS, NT_DIMS, Geometry, KernelPlan,
                                                 block_copies, dot, footprint, inverse_tables,
                                                 per_row, query_row_mask, query_tile_scratch,
                                                 query_tile_specs, tile_block_loop,
                                                 to_column, token_selected, tokens_along)


# ----------------------------------------------------------------------------- dQ

def _dq_kernel(*refs, geo: Geometry):
    if geo.has_segments:
        (rows_ref, q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_hbm, v_hbm, kseg_hbm, dq_ref,
         kbuf, vbuf, ksbuf, sem, acc_ref, lse_col_ref, delta_col_ref, qseg_col_ref,
         slot_ref) = refs
    else:
        (rows_ref, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dq_ref,
         kbuf, vbuf, sem, acc_ref, lse_col_ref, delta_col_ref, slot_ref) = refs
        qseg_ref = kseg_hbm = ksbuf = qseg_col_ref = None
    b, h, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    acc_ref[...] = jnp.zeros_like(acc_ref)
    lse_col_ref[...] = to_column(lse_ref[...])
    delta_col_ref[...] = to_column(delta_ref[...])
    if geo.has_segments:
        qseg_col_ref[...] = to_column(qseg_ref[...].astype(jnp.float32))

    def body(block, word, slot):
        k, v = kbuf[slot], vbuf[slot]
        s = dot(q_ref[...].reshape(geo.rows, geo.d), k, NT_DIMS) * geo.scale       # (R, bs)
        segs = ((qseg_col_ref[...], ksbuf[slot].astype(jnp.float32))
                if geo.has_segments else ())
        mask = query_row_mask(geo, tile, block, word, *segs)
        p = jnp.exp(jnp.where(mask, s, -jnp.inf) - lse_col_ref[...])
        dp = dot(do_ref[...].reshape(geo.rows, geo.d), v, NT_DIMS)                   # (R, bs)
        ds = p * (dp - delta_col_ref[...])
        acc_ref[...] += dot(ds.astype(k.dtype), k, NN_DIMS)

    copies = block_copies(geo, b, h, k_hbm, v_hbm, kseg_hbm, kbuf, vbuf, ksbuf, sem)
    tile_block_loop(rows_ref, slot_ref, tile, geo.num_tiles, geo.union, copies, body)
    dq_ref[...] = (acc_ref[...] * geo.scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def dq_plan(geo: Geometry, dtype):
    """``call(rows, q, do, lse, delta, [qseg_rows], k_blocks, v_blocks, [kseg_blocks]) -> dq``."""
    r, d, bs, w = geo.rows, geo.d, geo.block_size, 2 + 2 * geo.union
    tile_map, q_spec, rows_spec, qseg_spec = query_tile_specs(geo)
    row_spec = pl.BlockSpec((None, None, None, 1, r), tile_map)
    in_specs = [rows_spec, q_spec, q_spec, row_spec, row_spec]
    in_specs += [qseg_spec] if qseg_spec is not None else []
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * (3 if geo.has_segments else 2)
    scratch = query_tile_scratch(geo, dtype)
    nt = geo.num_tiles
    call = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(geo.b, geo.kv, nt), in_specs=in_specs,
            out_specs=q_spec, scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct((geo.b, nt * geo.tq, geo.kv, geo.g, d), dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=geo.interpret, name="infllmv2_dq")
    tile = (geo.tq, geo.g, d)
    blocks = [((1, w), jnp.int32, "smem"), (tile, dtype, "vmem"), (tile, dtype, "vmem"),
              ((1, r), jnp.float32, "vmem"), ((1, r), jnp.float32, "vmem"), (tile, dtype, "vmem")]
    scr = [((2, bs, d), dtype, "vmem"), ((2, bs, d), dtype, "vmem"), ((r, d), jnp.float32, "vmem"),
           ((r, 1), jnp.float32, "vmem"), ((r, 1), jnp.float32, "vmem"), ((1,), jnp.int32, "smem")]
    if geo.has_segments:
        blocks.append(((1, r), jnp.int32, "vmem"))
        scr += [((2, 1, bs), jnp.int32, "vmem"), ((r, 1), jnp.float32, "vmem")]
    return KernelPlan(call, footprint(blocks, scr))


# ----------------------------------------------------------------------------- dK/dV

def _dkv_kernel(*refs, geo: Geometry):
    if geo.has_segments:
        (csr_ref, k_ref, v_ref, kseg_ref, tile_hbm, bits_hbm, q_hbm, do_hbm, lse_hbm, delta_hbm,
         qseg_hbm, dk_ref, dv_ref, qbuf, dobuf, lsebuf, deltabuf, qsbuf, sem, win_sem,
         tile_win, bits_win, dk_acc, dv_acc, kseg_col_ref) = refs
    else:
        (csr_ref, k_ref, v_ref, tile_hbm, bits_hbm, q_hbm, do_hbm, lse_hbm, delta_hbm,
         dk_ref, dv_ref, qbuf, dobuf, lsebuf, deltabuf, sem, win_sem,
         tile_win, bits_win, dk_acc, dv_acc) = refs
        kseg_ref = qseg_hbm = qsbuf = kseg_col_ref = None
    b, h, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    win = geo.pair_window
    first, n = csr_ref[0, 0], csr_ref[0, 1]
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)
    if geo.has_segments:
        kseg_col_ref[...] = to_column(kseg_ref[...].astype(jnp.float32))       # (bs, 1)

    def fetch_window(pos):
        w = jax.lax.div(pos, win)
        for src, dst in ((tile_hbm, tile_win), (bits_hbm, bits_win)):
            c = pltpu.make_async_copy(src.at[b, h, w], dst, win_sem.at[0])
            c.start()
            c.wait()

    def copies(tile, slot):
        tokens = pl.ds(tile * geo.tq, geo.tq)
        out = [pltpu.make_async_copy(q_hbm.at[b, tokens, h], qbuf.at[slot], sem.at[slot]),
               pltpu.make_async_copy(do_hbm.at[b, tokens, h], dobuf.at[slot], sem.at[slot]),
               pltpu.make_async_copy(lse_hbm.at[b, h, tile], lsebuf.at[slot], sem.at[slot]),
               pltpu.make_async_copy(delta_hbm.at[b, h, tile], deltabuf.at[slot], sem.at[slot])]
        if geo.has_segments:
            out.append(pltpu.make_async_copy(qseg_hbm.at[b, tile], qsbuf.at[slot], sem.at[slot]))
        return out

    @pl.when(n > 0)
    def _():
        fetch_window(first)
        for c in copies(tile_win[jax.lax.rem(first, win)], 0):
            c.start()


    kpos = block * geo.block_size + jax.lax.broadcasted_iota(jnp.int32, (geo.block_size, 1), 0)
    tok = tokens_along((1, geo.rows), 1, geo.g)

    def step(j, carry):
        tile, word = carry
        slot = jax.lax.rem(j, 2)
        nxt = first + j + 1

        @pl.when((j + 1 < n) & (jax.lax.rem(nxt, win) == 0))
        def _():
            fetch_window(nxt)

        next_tile, next_word = tile_win[jax.lax.rem(nxt, win)], bits_win[jax.lax.rem(nxt, win)]

        @pl.when(j + 1 < n)
        def _():
            for c in copies(next_tile, 1 - slot):
                c.start()

        for c in copies(tile, slot):
            c.wait()
        q = qbuf[slot].reshape(geo.rows, geo.d)
        do = dobuf[slot].reshape(geo.rows, geo.d)
        k, v = k_ref[...], v_ref[...]
        s = dot(k, q, NT_DIMS) * geo.scale                                          # (bs, R)
        mask = token_selected(word, tok) & (kpos <= tile * geo.tq + tok)
        if geo.has_segments:
            qs = qsbuf[slot].astype(jnp.float32)                                     # (1, R)
            ks = kseg_col_ref[...]
            mask &= (ks == qs) & (ks != 0)
        p = jnp.exp(jnp.where(mask, s, -jnp.inf) - lsebuf[slot])
        dv_acc[...] += dot(p.astype(do.dtype), do, NN_DIMS)
        dp = dot(v, do, NT_DIMS)                                                     # (bs, R)
        ds = p * (dp - deltabuf[slot])
        dk_acc[...] += dot(ds.astype(q.dtype), q, NN_DIMS)
        return next_tile, next_word

    head = jax.lax.rem(first, win)            # read after the window fetch (unused if n == 0)
    jax.lax.fori_loop(0, n, step, (tile_win[head], bits_win[head]))
    dk_ref[...] = (dk_acc[...] * geo.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dkv_plan(geo: Geometry, dtype):
    """``call(csr, k_blocks, v_blocks, [kseg_blocks], pair_tile, pair_bits, q, do, lse, delta,
    [qseg_rows]) -> (dk_blocks, dv_blocks)``."""
    r, d, bs, win = geo.rows, geo.d, geo.block_size, geo.pair_window
    blk_map = lambda b, h, m: (b, h, m, 0, 0)
    in_specs = [pl.BlockSpec((None, None, None, 1, 2), blk_map, memory_space=pltpu.SMEM),
                pl.BlockSpec((None, None, None, bs, d), blk_map),
                pl.BlockSpec((None, None, None, bs, d), blk_map)]
    if geo.has_segments:
        in_specs.append(pl.BlockSpec((None, None, 1, bs), lambda b, h, m: (b, m, 0, 0)))
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * (7 if geo.has_segments else 6)
    tile = (geo.tq, geo.g, d)
    scratch = [pltpu.VMEM((2, *tile), dtype), pltpu.VMEM((2, *tile), dtype),
               pltpu.VMEM((2, 1, r), jnp.float32), pltpu.VMEM((2, 1, r), jnp.float32)]
    if geo.has_segments:
        scratch.append(pltpu.VMEM((2, 1, r), jnp.int32))
    scratch += [pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((1,)),
                pltpu.SMEM((win,), jnp.int32), pltpu.SMEM((win,), jnp.int32),
                pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, d), jnp.float32)]
    if geo.has_segments:
        scratch.append(pltpu.VMEM((bs, 1), jnp.float32))
    m = geo.num_blocks
    out_spec = pl.BlockSpec((None, None, None, bs, d), blk_map)
    call = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(geo.b, geo.kv, m), in_specs=in_specs,
            out_specs=[out_spec, out_spec], scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct((geo.b, geo.kv, m, bs, d), dtype)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=geo.interpret, name="infllmv2_dkv")
    blocks = [((1, 2), jnp.int32, "smem"), ((bs, d), dtype, "vmem"), ((bs, d), dtype, "vmem"),
              ((bs, d), dtype, "vmem"), ((bs, d), dtype, "vmem")]
    scr = [((2, *tile), dtype, "vmem"), ((2, *tile), dtype, "vmem"),
           ((2, 1, r), jnp.float32, "vmem"), ((2, 1, r), jnp.float32, "vmem"),
           ((win,), jnp.int32, "smem"), ((win,), jnp.int32, "smem"),
           ((bs, d), jnp.float32, "vmem"), ((bs, d), jnp.float32, "vmem")]
    if geo.has_segments:
        blocks.append(((1, bs), jnp.int32, "vmem"))
        scr += [((2, 1, r), jnp.int32, "vmem"), ((bs, 1), jnp.float32, "vmem")]
    return KernelPlan(call, footprint(blocks, scr))


# ----------------------------------------------------------------------------- wiring

def backward(geo: Geometry, q_t, k_b, v_b, rows, qseg, kseg, o, lse, do):
    """Cotangents of q (``[B, nT * tq, K, G, D]``), k and v (block layout)."""
    delta = per_row(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), geo)
    do = do.astype(q_t.dtype)
    segs_q = (qseg,) if geo.has_segments else ()
    segs_k = (kseg,) if geo.has_segments else ()
    dq = dq_plan(geo, q_t.dtype).call(rows, q_t, do, lse, delta, *segs_q, k_b, v_b, *segs_k)
    csr, pair_tile, pair_bits = inverse_tables(rows, geo)
    dk, dv = dkv_plan(geo, k_b.dtype).call(csr, k_b, v_b, *segs_k, pair_tile, pair_bits, q_t, do,
                                           lse, delta, *segs_q)
    return dq, dk, dv
