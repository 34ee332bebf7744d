"""InfLLM v2 stage 2 as a Pallas TPU (Mosaic) block-sparse attention kernel, forward + backward.

Semantics (as :func:`mcpm_kernels.infllmv2.reference.attention_reference`'s last step): query i
(all G query heads of kv group g) attends, with one float32 softmax, to the keys t <= i whose block
``t // block_size`` is among the query's valid slots of ``idx[b, g, i, :]`` and, with
``segment_ids`` (0 = padding), to those of its own nonzero segment. Rows with no visible key give
0. A block listed twice for one query counts once (the kernel works on the set of blocks).

Design (layouts and tables: :mod:`mcpm_kernels.infllmv2.pallas_tables`):

- A query tile is tq tokens x the G heads of one kv group (R = G * tq rows, 128 in the 8B), read
  straight from the model's ``[B, T, N, D]`` layout as a ``(tq, G, D)`` block, so every K/V
  block fetched for the tile serves all G heads.
- Forward grid ``(B, K, nT)``. Each step's SMEM block is its tile's row of the table: the
  sorted union of the blocks its tokens selected, a count and one bit word per block (which of
  the tile's tokens chose it). K/V stay in HBM; the step loops over exactly ``count`` blocks
  with double-buffered manual DMAs (the first block of the next tile is fetched during the last
  block of this one), so the work is the real union size, not a padded worst case, and SMEM
  holds only one tile's row (independent of T). Online softmax in float32 VMEM scratch; the
  token mask (selected bit, causal, segment) is built from iotas and the bit word.
- Backward (``pallas_attention_bwd``): ``delta = rowsum(o * do)``; a dQ kernel on the forward's
  grid and loop; a dK/dV kernel with one grid step per key block, looping over the query tiles
  that selected it (the inverse map, sorted (tile, block) pairs read from HBM a window at a time
  into SMEM), accumulating dK/dV in float32 VMEM scratch and writing every key block once.
- ``interpret=True`` (or ``pltpu.InterpretParams``) runs the same kernels on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mcpm_kernels.infllmv2 import pallas_attention_bwd as bwd
from mcpm_kernels.infllmv2.pallas_tables import (MAX_TILE_TOKENS, NN_DIMS, NT_DIMS, BlockSizes,
                                                 Geometry, KernelPlan, block_copies, dot,
                                                 footprint, keys_to_blocks, queries_to_tiles,
                                                 query_row_mask, query_tile_scratch, query_tile_specs,
                                                 segment_blocks, segment_rows,
                                                 tile_block_loop, tile_rows, tiles_to_queries,
                                                 to_column, to_row, union_bound)
from mcpm_kernels.infllmv2.reference import attention_reference
from mcpm_kernels.infllmv2.pallas_selection import select_block_lists_pallas


def _forward_kernel(*refs, geo: Geometry):
    if geo.has_segments:
        (rows_ref, q_ref, qseg_ref, k_hbm, v_hbm, kseg_hbm, o_ref, lse_ref,
         kbuf, vbuf, ksbuf, sem, acc_ref, m_ref, l_ref, qseg_col_ref, slot_ref) = refs
    else:
        (rows_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref,
         kbuf, vbuf, sem, acc_ref, m_ref, l_ref, slot_ref) = refs
        qseg_ref = kseg_hbm = ksbuf = qseg_col_ref = None
    b, h, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    if geo.has_segments:
        qseg_col_ref[...] = to_column(qseg_ref[...].astype(jnp.float32))

    def body(block, word, slot):
        q = q_ref[...].reshape(geo.rows, geo.d)
        s = dot(q, kbuf[slot], NT_DIMS) * geo.scale                               # (R, bs)
        segs = ((qseg_col_ref[...], ksbuf[slot].astype(jnp.float32))
                if geo.has_segments else ())
        mask = query_row_mask(geo, tile, block, word, *segs)
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)      # rows with nothing visible yet
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        v = vbuf[slot]
        acc_ref[...] = alpha * acc_ref[...] + dot(p.astype(v.dtype), v, NN_DIMS)
        m_ref[...] = m_new

    copies = block_copies(geo, b, h, k_hbm, v_hbm, kseg_hbm, kbuf, vbuf, ksbuf, sem)
    tile_block_loop(rows_ref, slot_ref, tile, geo.num_tiles, geo.union, copies, body)
    l = l_ref[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_ref[...] / safe_l).astype(o_ref.dtype).reshape(o_ref.shape)
    # +inf for rows that saw nothing: exp(s - lse) is then 0 in the backward, never NaN
    lse_ref[...] = to_row(jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(safe_l)))


def forward_plan(geo: Geometry, dtype) -> KernelPlan:
    """``call(rows, q, [qseg_rows], k_blocks, v_blocks, [kseg_blocks]) -> (o, lse)``."""
    r, d, bs, w = geo.rows, geo.d, geo.block_size, 2 + 2 * geo.union
    tile_map, q_spec, rows_spec, qseg_spec = query_tile_specs(geo)
    in_specs = [rows_spec, q_spec] + ([qseg_spec] if qseg_spec is not None else [])
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * (3 if geo.has_segments else 2)
    out_specs = [q_spec, pl.BlockSpec((None, None, None, 1, r), tile_map)]
    scratch = query_tile_scratch(geo, dtype)
    nt = geo.num_tiles
    call = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(geo.b, geo.kv, nt), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct((geo.b, nt * geo.tq, geo.kv, geo.g, d), dtype),
                   jax.ShapeDtypeStruct((geo.b, geo.kv, nt, 1, r), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=geo.interpret, name="infllmv2_fwd")
    tile = (geo.tq, geo.g, d)
    blocks = [((1, w), jnp.int32, "smem"), (tile, dtype, "vmem"), (tile, dtype, "vmem"),
              ((1, r), jnp.float32, "vmem")]
    scr = [((2, bs, d), dtype, "vmem"), ((2, bs, d), dtype, "vmem"), ((r, d), jnp.float32, "vmem"),
           ((r, 1), jnp.float32, "vmem"), ((r, 1), jnp.float32, "vmem"), ((1,), jnp.int32, "smem")]
    if geo.has_segments:
        blocks.append(((1, r), jnp.int32, "vmem"))
        scr += [((2, 1, bs), jnp.int32, "vmem"), ((r, 1), jnp.float32, "vmem")]
    return KernelPlan(call, footprint(blocks, scr))


def _forward(geo, q_t, k_b, v_b, rows, qseg, kseg):
    segs_q = (qseg,) if geo.has_segments else ()
    segs_k = (kseg,) if geo.has_segments else ()
    return forward_plan(geo, q_t.dtype).call(rows, q_t, *segs_q, k_b, v_b, *segs_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_tiles(geo, q_t, k_b, v_b, rows, qseg, kseg):
    return _forward(geo, q_t, k_b, v_b, rows, qseg, kseg)[0]


def _attention_tiles_fwd(geo, q_t, k_b, v_b, rows, qseg, kseg):
    o, lse = _forward(geo, q_t, k_b, v_b, rows, qseg, kseg)
    return o, (q_t, k_b, v_b, rows, qseg, kseg, o, lse)


def _attention_tiles_bwd(geo, res, do):
    q_t, k_b, v_b, rows, qseg, kseg, o, lse = res
    dq, dk, dv = bwd.backward(geo, q_t, k_b, v_b, rows, qseg, kseg, o, lse, do)
    return dq, dk, dv, None, None, None


_attention_tiles.defvjp(_attention_tiles_fwd, _attention_tiles_bwd)


def make_geometry(q_shape, kv: int, p: int, block_size: int, *, sizes: BlockSizes = BlockSizes(),
                  has_segments: bool = False, max_blocks_per_tile: int | None = None,
                  interpret=False) -> Geometry:
    """The static sizes of one call (see :class:`Geometry`)."""
    b, t, n, d = q_shape
    if n % kv:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv})")
    g = n // kv
    tq = sizes.tile_tokens(g)
    assert tq <= MAX_TILE_TOKENS
    m = -(-t // block_size)
    u = union_bound(p, m, tq, block_size)
    if max_blocks_per_tile is not None:
        u = max(1, min(u, max_blocks_per_tile))
    return Geometry(b=b, t=t, kv=kv, g=g, d=d, block_size=block_size, tq=tq, union=u,
                    pair_window=sizes.pair_window, has_segments=has_segments, interpret=interpret)


def block_sparse_attention(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array,
                           idx_bktp: jax.Array, valid_bktp: jax.Array,
                           segment_ids_bt: jax.Array | None = None, *, block_size: int,
                           sizes: BlockSizes = BlockSizes(),
                           max_blocks_per_tile: int | None = None, interpret=False) -> jax.Array:
    """Block-sparse attention ``[B, T, N, D]`` over per-query block lists (module docstring).

    ``idx``/``valid [B, K, T, P]``: the key blocks each query attends (as from
    ``select_block_lists``); they are not differentiated. ``max_blocks_per_tile``: a bound on
    the distinct blocks one query tile selects (default: ``min(M, tq * P)``, safe for any lists;
    :func:`union_bound` gives a tighter one for InfLLM v2 lists). ``interpret``: True or
    ``pltpu.InterpretParams`` to run on CPU. Differentiable in q, k, v.
    """
    if not q_btnd.dtype == k_btkd.dtype == v_btkd.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q_btnd.dtype}, {k_btkd.dtype}, "
                         f"{v_btkd.dtype}")
    kv = k_btkd.shape[2]
    geo = make_geometry(q_btnd.shape, kv, idx_bktp.shape[-1], block_size, sizes=sizes,
                        has_segments=segment_ids_bt is not None,
                        max_blocks_per_tile=max_blocks_per_tile, interpret=interpret)
    rows = tile_rows(idx_bktp, valid_bktp, geo)
    if segment_ids_bt is not None:
        qseg, kseg = segment_rows(segment_ids_bt, geo), segment_blocks(segment_ids_bt, geo)
    else:
        qseg = kseg = None
    o = _attention_tiles(geo, queries_to_tiles(q_btnd, geo), keys_to_blocks(k_btkd, geo),
                         keys_to_blocks(v_btkd, geo), rows, qseg, kseg)
    return tiles_to_queries(o, geo)


def default_interpret() -> bool:
    """Interpret (run the kernels on CPU) when the default backend is the CPU."""
    return jax.default_backend() == "cpu"


def attention_pallas(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, cfg,
                     segment_ids_bt: jax.Array | None = None, *,
                     k_for_scoring_btkd: jax.Array | None = None, interpret=None,
                     sizes: BlockSizes = BlockSizes(), select_chunk: int = 2048) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]``: block selection with the Pallas stage-1 scoring
    kernel (:mod:`~mcpm_kernels.infllmv2.pallas_selection`), then the block-sparse kernel.

    Below ``dense_len`` the dense reference, as :func:`attention_xla`. ``k_for_scoring_btkd``:
    the pre-RoPE keys when ``use_nope``. ``interpret=None``: :func:`default_interpret`.
    """
    t, n = q_btnd.shape[1], q_btnd.shape[2]
    if cfg.dense_len != -1 and t < cfg.dense_len:
        return attention_reference(q_btnd, k_btkd, v_btkd, cfg, segment_ids_bt)
    interpret = default_interpret() if interpret is None else interpret
    if not interpret and jax.default_backend() == "gpu":
        # Mosaic TPU kernels: on a GPU they fail deep inside Pallas with a bare AssertionError
        raise ValueError("the InfLLM v2 Pallas kernels are TPU (Mosaic) kernels and do not run "
                         "on a GPU: use implementation='xla'")
    idx, valid = select_block_lists_pallas(q_btnd, k_btkd, cfg, chunk=select_chunk,
                                           k_for_scoring_btkd=k_for_scoring_btkd,
                                           interpret=interpret)
    bs = cfg.block_size
    m = -(-t // bs)
    if cfg.variant == "A":                      # top-k slots + the W window blocks
        bound = union_bound(idx.shape[-1], m, sizes.tile_tokens(n // k_btkd.shape[2]), bs,
                            topk=min(cfg.topk, m), window_blocks=cfg.window_size // bs)
    else:
        bound = None
    return block_sparse_attention(
        q_btnd, k_btkd, v_btkd, idx, valid, segment_ids_bt, block_size=bs, sizes=sizes,
        max_blocks_per_tile=bound, interpret=interpret)


__all__ = ["BlockSizes", "attention_pallas", "block_sparse_attention", "default_interpret",
           "forward_plan", "make_geometry"]
