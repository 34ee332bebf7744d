"""Geometry, layouts and index tables of the InfLLM v2 Pallas kernels (plain JAX, outside kernels).

Letters: B batch, T positions, N query heads, K kv heads, G = N / K, D head_dim, P slots per query
(topk + W), bs key block size, M = ceil(T / bs) key blocks, tq tokens per query tile,
R = G * tq rows per query tile, nT = ceil(T / tq) query tiles, U = most distinct key blocks one
query tile can select.

Layouts at the kernel boundary (zero padded; padded queries select nothing and padded keys sit
past every real query, so the causal mask hides them):

- queries, outputs and their cotangents stay in the model's layout, viewed as ``[B, T, K, G, D]``
  (padded to nT * tq tokens only when T is not a multiple of tq): a tile is the block
  ``(tq, G, D)`` of one kv head, used in the kernel as R rows, token-major
  (``row = token * G + g``), so all G heads of a kv group share every K/V block loaded.
- keys/values ``[B, K, M, bs, D]``: one DMA slab per key block (a small transposed copy; K/V are
  G times smaller than the queries).
- log-sum-exp and ``delta = rowsum(o * do)`` ``[B, K, nT, 1, R]`` float32, lane-dense rows.
- segment ids, query side ``[B, nT, 1, R]`` (per row), key side ``[B, M, 1, bs]``.

Index tables, all linear in T at fixed topk/window, never whole in SMEM:

- ``rows [B, K, nT, 1, 2 + 2U]`` int32, one per query tile, the forward and dQ kernels' SMEM block
  for that grid step: ``[count, first block of the next tile, blocks[U], bits[U]]``. ``blocks`` is
  the sorted union of the key blocks the tile's tokens selected (``count`` of them, at least 1),
  ``bits[u]`` has bit ``token`` set when that token selected ``blocks[u]`` (so ``tq <= 32``). The
  union is a set: a block listed twice for one query is attended once.
- the inverse map for dK/dV: every (tile, block) pair with a nonzero bit word, sorted by key block,
  as ``pair_tile``/``pair_bits [B, K, nW, WIN]`` (read WIN entries at a time into SMEM) and per key
  block ``csr [B, K, M, 1, 2] = (first pair, number of pairs)``. Every key block gets a grid step,
  so its dK/dV is written (zeros when no query chose it).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BIG = np.iinfo(np.int32).max
MAX_TILE_TOKENS = 32  # one int32 bit word per (tile, block): bit t = token t of the tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels (the key block is the config's block_size).

    ``query_rows``: target rows per query tile (tokens x G heads); tokens per tile are rounded up
    to a multiple of 8 and capped at 32. 128 rows (8 tokens x 16 heads in the 8B) fill the MXU
    and keep the union of the tile's selections close to one token's 96 blocks.
    ``pair_window``: dK/dV pair-list entries held in SMEM at a time (two int32 arrays).
    """

    query_rows: int = 128
    pair_window: int = 512

    def __post_init__(self):
        if self.query_rows < 1:
            raise ValueError(f"query_rows must be positive, got {self.query_rows}")
        if self.pair_window < 8 or self.pair_window % 8:
            raise ValueError(f"pair_window must be a positive multiple of 8, "
                             f"got {self.pair_window}")

    def tile_tokens(self, g: int) -> int:
        tq = -(-self.query_rows // g)
        return min(MAX_TILE_TOKENS, 8 * -(-tq // 8))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable: it is the custom_vjp's static argument)."""

    b: int
    t: int
    kv: int
    g: int
    d: int
    block_size: int
    tq: int
    union: int           # U
    pair_window: int
    has_segments: bool
    interpret: object = False

    @property
    def rows(self) -> int:
        return self.g * self.tq

    @property
    def num_tiles(self) -> int:
        return -(-self.t // self.tq)

    @property
    def num_blocks(self) -> int:
        return -(-self.t // self.block_size)

    @property
    def num_pairs(self) -> int:
        """Length of the padded dK/dV pair list (a multiple of the SMEM window)."""
        n = self.num_tiles * self.union
        return self.pair_window * -(-n // self.pair_window)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)


def union_bound(p: int, num_blocks: int, tq: int, block_size: int,
                topk: int | None = None, window_blocks: int | None = None) -> int:
    """Most distinct blocks the tq tokens of one tile can select: ``min(M, tq * P)`` for any
    lists; with the InfLLM v2 structure (``topk`` free slots + the W window blocks of the token's
    own query block) ``tq * topk + W + ceil(tq / bs) + 1`` (the tile spans that many query
    blocks at most, and neighbouring windows overlap in all but one block)."""
    bound = min(num_blocks, tq * p)
    if topk is not None and window_blocks is not None:
        bound = min(bound, tq * topk + window_blocks + -(-tq // block_size) + 1)
    return max(1, bound)


# ----------------------------------------------------------------------------- layouts

def _pad_axis(x: jax.Array, size: int, axis: int, value=0) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def queries_to_tiles(x_btnd: jax.Array, geo: Geometry) -> jax.Array:
    """``[B, T, N, D] -> [B, nT * tq, K, G, D]`` (a reshape, plus padding when needed)."""
    b, _, _, d = x_btnd.shape
    x = _pad_axis(x_btnd, geo.num_tiles * geo.tq, 1)
    return x.reshape(b, geo.num_tiles * geo.tq, geo.kv, geo.g, d)


def tiles_to_queries(x: jax.Array, geo: Geometry) -> jax.Array:
    """Inverse of :func:`queries_to_tiles`."""
    b, tp, kv, g, d = x.shape
    return x.reshape(b, tp, kv * g, d)[:, :geo.t]


def per_row(x_btkg: jax.Array, geo: Geometry) -> jax.Array:
    """A value per query row ``[B, nT * tq, K, G] -> [B, K, nT, 1, R]`` (as lse and delta)."""
    b = x_btkg.shape[0]
    x = x_btkg.reshape(b, geo.num_tiles, geo.tq, geo.kv, geo.g).transpose(0, 3, 1, 2, 4)
    return x.reshape(b, geo.kv, geo.num_tiles, 1, geo.rows)


def keys_to_blocks(x_btkd: jax.Array, geo: Geometry) -> jax.Array:
    """``[B, T, K, D] -> [B, K, M, bs, D]``."""
    b, _, kv, d = x_btkd.shape
    x = _pad_axis(x_btkd, geo.num_blocks * geo.block_size, 1)
    return x.reshape(b, geo.num_blocks, geo.block_size, kv, d).transpose(0, 3, 1, 2, 4)


def blocks_to_keys(x: jax.Array, geo: Geometry) -> jax.Array:
    """Inverse of :func:`keys_to_blocks`."""
    b, kv, m, bs, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, m * bs, kv, d)[:, :geo.t]


def segment_rows(seg_bt: jax.Array, geo: Geometry) -> jax.Array:
    """Query-side segment id of every tile row: ``[B, nT, 1, R]`` int32 (0 = padding)."""
    b = seg_bt.shape[0]
    s = _pad_axis(seg_bt.astype(jnp.int32), geo.num_tiles * geo.tq, 1)
    s = jnp.broadcast_to(s.reshape(b, geo.num_tiles, geo.tq, 1),
                         (b, geo.num_tiles, geo.tq, geo.g))
    return s.reshape(b, geo.num_tiles, 1, geo.rows)


def segment_blocks(seg_bt: jax.Array, geo: Geometry) -> jax.Array:
    """Key-side segment ids per key block: ``[B, M, 1, bs]`` int32."""
    b = seg_bt.shape[0]
    s = _pad_axis(seg_bt.astype(jnp.int32), geo.num_blocks * geo.block_size, 1)
    return s.reshape(b, geo.num_blocks, 1, geo.block_size)


# ----------------------------------------------------------------------------- tables

def tile_rows(idx_bktp: jax.Array, valid_bktp: jax.Array, geo: Geometry) -> jax.Array:
    """Per query tile, its sorted union of selected blocks and per-token bit words.

    ``idx``/``valid [B, K, T, P]`` (as from ``select_block_lists``); invalid slots and indices
    outside ``[0, M)`` are ignored. Returns ``rows [B, K, nT, 1, 2 + 2U]`` int32 (module doc).
    ``geo.union`` must bound the union size (:func:`union_bound`); entries past it are lost.
    Built from two row sorts and a cumsum (no scatters: TPU compile time grows with their size).
    """
    b, kv, _, p = idx_bktp.shape
    nt, tq, u, m = geo.num_tiles, geo.tq, geo.union, geo.num_blocks
    idx = jax.lax.stop_gradient(idx_bktp).astype(jnp.int32)
    ok = valid_bktp & (idx >= 0) & (idx < m)
    idx = _pad_axis(idx, nt * tq, 2)
    ok = _pad_axis(ok, nt * tq, 2, value=False)
    token = jnp.arange(nt * tq, dtype=jnp.int32) % tq
    # one key per (block, token): sorting groups a tile's entries by block, then token
    key = jnp.where(ok, idx * tq + token[:, None], BIG).reshape(b * kv * nt, tq * p)
    key = jnp.sort(key, axis=-1)
    present = key != BIG
    blk, tok = key // tq, key % tq
    edge = jnp.full_like(key[:, :1], -1)
    first = present & (key != jnp.concatenate([edge, key[:, :-1]], axis=1))   # dedupe token
    last = present & (blk != jnp.concatenate([blk[:, 1:], edge], axis=1))    # end of a block
    bit = jnp.where(first, jnp.left_shift(jnp.uint32(1), tok.astype(jnp.uint32)), jnp.uint32(0))
    running = jnp.cumsum(bit, axis=1, dtype=jnp.uint32)     # wraps; differences stay exact
    # compact the block runs to the front, in block order, with the running sum at their ends
    blocks, ends = jax.lax.sort((jnp.where(last, blk, BIG), running), dimension=1, num_keys=1)
    blocks, ends = blocks[:, :u], ends[:, :u]
    words = ends - jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    live = blocks != BIG
    blocks = jnp.where(live, blocks, 0)
    words = jax.lax.bitcast_convert_type(jnp.where(live, words, jnp.uint32(0)), jnp.int32)
    # at least one entry per tile (block 0, no token bits: fully masked) keeps the kernels'
    # DMA pipeline uniform; real tiles always have one (every token sees its own block)
    count = jnp.maximum(last.sum(axis=1, dtype=jnp.int32), 1)
    blocks = blocks.reshape(b, kv, nt, u)
    nxt = jnp.concatenate([blocks[:, :, 1:, 0], jnp.zeros((b, kv, 1), jnp.int32)], axis=2)
    rows = jnp.concatenate([count.reshape(b, kv, nt, 1), nxt[..., None], blocks,
                            words.reshape(b, kv, nt, u)], axis=-1)
    return rows[:, :, :, None, :]


def inverse_tables(rows: jax.Array, geo: Geometry) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The dK/dV kernel's inverse map from the tile rows.

    Returns ``csr [B, K, M, 1, 2]`` (first pair, pair count) per key block and ``pair_tile``,
    ``pair_bits [B, K, nW, WIN]``: the (tile, block) pairs with a nonzero bit word sorted by block
    (then tile), padded with zeros to ``geo.num_pairs``. One sort of nT * U entries per kv head.
    """
    b, kv = rows.shape[:2]
    nt, u, m, win = geo.num_tiles, geo.union, geo.num_blocks, geo.pair_window
    r = rows[:, :, :, 0, :]
    count, blocks, words = r[..., 0], r[..., 2:2 + u], r[..., 2 + u:]
    live = (jnp.arange(u)[None, None, None, :] < count[..., None]) & (words != 0)
    tile = jnp.arange(nt, dtype=jnp.int32)[None, None, :, None]
    key = jnp.where(live, blocks * nt + tile, BIG).reshape(b, kv, nt * u)
    key, bits = jax.lax.sort((key, words.reshape(b, kv, nt * u)), dimension=2, num_keys=1)
    present = key != BIG
    pair_tile = jnp.where(present, key % nt, 0)
    pair_bits = jnp.where(present, bits, 0)
    blk = jnp.where(present, key // nt, m)                                   # ascending
    find = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, jnp.arange(m + 1))))
    bounds = find(blk).astype(jnp.int32)                                     # [B, K, M + 1]
    csr = jnp.stack([bounds[..., :m], bounds[..., 1:] - bounds[..., :m]], axis=-1)
    pad = geo.num_pairs - nt * u
    pair_tile = _pad_axis(pair_tile, nt * u + pad, 2).reshape(b, kv, -1, win)
    pair_bits = _pad_axis(pair_bits, nt * u + pad, 2).reshape(b, kv, -1, win)
    return csr[:, :, :, None, :], pair_tile, pair_bits


def table_bytes(geo: Geometry) -> dict[str, int]:
    """HBM bytes of the index tables and the kernels' small per-row arrays."""
    b, kv, nt, u, m = geo.b, geo.kv, geo.num_tiles, geo.union, geo.num_blocks
    out = {"tile rows (fwd, dQ)": b * kv * nt * (2 + 2 * u) * 4,
           "pair list (dK/dV)": 2 * b * kv * geo.num_pairs * 4,
           "per-block csr (dK/dV)": b * kv * m * 2 * 4,
           "lse + delta rows": 2 * b * kv * nt * geo.rows * 4}
    if geo.has_segments:
        out["segment ids"] = b * nt * geo.rows * 4 + b * m * geo.block_size * 4
    return out


# ----------------------------------------------------------------------------- inside kernels
# Helpers the kernels share: how a row or lane maps to a token, how a bit word becomes a token
# mask, matmuls with float32 accumulation, and the double-buffered DMA loop over one tile's
# union of key blocks (forward and dQ).

def tokens_along(shape: tuple[int, int], axis: int, g: int) -> jax.Array:
    """Token of each row (axis 0) or lane (axis 1) of a tile: ``row // G`` (token-major rows)."""
    return jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, shape, axis), g)


def token_selected(word: jax.Array, tok: jax.Array) -> jax.Array:
    """Bit ``tok`` of the scalar bit word: did that token of the tile select the block."""
    return jnp.bitwise_and(jnp.right_shift(word, tok), 1) == 1


def to_column(row: jax.Array) -> jax.Array:
    """``(1, n)`` float32 -> ``(n, 1)`` (a transpose through one 128-lane tile)."""
    n = row.shape[1]
    return jnp.broadcast_to(row, (128, n)).T[:, :1]


def to_row(col: jax.Array) -> jax.Array:
    """``(n, 1)`` float32 -> ``(1, n)``."""
    n = col.shape[0]
    return jnp.broadcast_to(col, (n, 128)).T[:1, :]


NT_DIMS = (((1,), (1,)), ((), ()))   # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))   # a @ b


def dot(a, b, dims):
    """Matmul with float32 accumulation (bf16 operands stay bf16; f32 ones at full precision)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.float32)


def query_row_mask(geo: Geometry, tile, block, word, qseg_col=None, kseg_row=None):
    """``(R, bs)`` bool: may each tile row see each key of ``block`` (selected bit, causal,
    segment). Forward and dQ orientation; the dK/dV kernel builds the transpose."""
    tok = tokens_along((geo.rows, 1), 0, geo.g)
    qpos = tile * geo.tq + tok
    kpos = block * geo.block_size + jax.lax.broadcasted_iota(jnp.int32, (1, geo.block_size), 1)
    mask = token_selected(word, tok) & (kpos <= qpos)
    if qseg_col is not None:
        mask &= (qseg_col == kseg_row) & (kseg_row != 0)
    return mask


def query_tile_specs(geo: Geometry):
    """Specs shared by the kernels whose grid runs over query tiles (fwd and dQ):
    ``(tile_map, q_spec, rows_spec, qseg_spec or None)`` for the per-tile tables, the
    ``[tq, g, d]`` query-layout tiles, the SMEM block-row table and the query segments."""
    tile_map = lambda b, h, t: (b, h, t, 0, 0)
    q_spec = pl.BlockSpec((None, geo.tq, None, geo.g, geo.d), lambda b, h, t: (b, t, h, 0, 0))
    rows_spec = pl.BlockSpec((None, None, None, 1, 2 + 2 * geo.union), tile_map,
                             memory_space=pltpu.SMEM)
    qseg_spec = (pl.BlockSpec((None, None, 1, geo.rows), lambda b, h, t: (b, t, 0, 0))
                 if geo.has_segments else None)
    return tile_map, q_spec, rows_spec, qseg_spec


def query_tile_scratch(geo: Geometry, dtype) -> list:
    """Scratch of a query tile looping over its key blocks (fwd and dQ), in kernel-argument
    order: double-buffered K and V blocks (and key segments), their DMA semaphores, the float32
    ``[rows, d]`` accumulator, two ``[rows, 1]`` row statistics (one more with segments), and
    the SMEM slot counter."""
    r, bs, d = geo.rows, geo.block_size, geo.d
    scratch = [pltpu.VMEM((2, bs, d), dtype), pltpu.VMEM((2, bs, d), dtype)]
    if geo.has_segments:
        scratch.append(pltpu.VMEM((2, 1, bs), jnp.int32))
    scratch += [pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((r, d), jnp.float32),
                pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32)]
    if geo.has_segments:
        scratch.append(pltpu.VMEM((r, 1), jnp.float32))
    scratch.append(pltpu.SMEM((1,), jnp.int32))
    return scratch


def block_copies(geo: Geometry, b, h, k_hbm, v_hbm, kseg_hbm, kbuf, vbuf, ksbuf, sem):
    """The async copies that bring key block ``block`` into buffer ``slot`` (fwd and dQ)."""
    def copies(block, slot):
        out = [pltpu.make_async_copy(k_hbm.at[b, h, block], kbuf.at[slot], sem.at[slot]),
               pltpu.make_async_copy(v_hbm.at[b, h, block], vbuf.at[slot], sem.at[slot])]
        if kseg_hbm is not None:
            out.append(pltpu.make_async_copy(kseg_hbm.at[b, block], ksbuf.at[slot], sem.at[slot]))
        return out
    return copies


def tile_block_loop(rows_ref, slot_ref, tile, num_tiles: int, union: int, copies, body):
    """Run ``body(block, bit_word, slot)`` over the tile's ``count`` union blocks.

    ``copies(block, slot)`` lists the async copies that bring one key block into buffer ``slot``
    (all on that slot's semaphore). Copies for entry j+1 start before entry j is computed; the
    last step of a tile starts the next tile's first block (``rows[1]``), so the grid's tile
    axis must run in order ("arbitrary"); the buffer parity carries over in ``slot_ref`` (SMEM).
    The first tile of each (batch, kv head) fetches its own first block.
    """
    n = rows_ref[0, 0]
    first_slot = jnp.where(tile == 0, 0, slot_ref[0])

    @pl.when(tile == 0)
    def _():
        for c in copies(rows_ref[0, 2], 0):
            c.start()

    def step(j, carry):
        slot = jax.lax.rem(first_slot + j, 2)

        @pl.when(j + 1 < n)
        def _():
            for c in copies(rows_ref[0, 3 + j], 1 - slot):
                c.start()

        block = rows_ref[0, 2 + j]
        for c in copies(block, slot):
            c.wait()
        body(block, rows_ref[0, 2 + union + j], slot)
        return carry

    jax.lax.fori_loop(0, n, step, 0)
    next_slot = jax.lax.rem(first_slot + n, 2)

    @pl.when(tile + 1 < num_tiles)
    def _():
        for c in copies(rows_ref[0, 1], next_slot):
            c.start()
        slot_ref[0] = next_slot


# ----------------------------------------------------------------------------- footprint

def _tile_padded_bytes(shape, dtype) -> int:
    """VMEM bytes of a buffer with Mosaic's native (8 x packing, 128) tiling of the last dims."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = tuple(shape) if len(shape) >= 2 else (1,) + tuple(shape)
    sub = 8 * max(1, 4 // itemsize)
    lead = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return lead * (-(-shape[-2] // sub) * sub) * (-(-shape[-1] // 128) * 128) * itemsize


@dataclasses.dataclass(frozen=True)
class Footprint:
    """On-chip memory of one kernel from its block shapes (x2: the pipeline double-buffers
    every blocked operand) and scratch. SMEM counted in 4-byte words without padding."""

    vmem_blocks: int
    vmem_scratch: int
    smem_blocks: int
    smem_scratch: int

    @property
    def vmem(self) -> int:
        return self.vmem_blocks + self.vmem_scratch

    @property
    def smem(self) -> int:
        return self.smem_blocks + self.smem_scratch


def footprint(blocks, scratch) -> Footprint:
    """``blocks``: (block shape without squeezed dims, dtype, memory) of each pipelined operand;
    ``scratch``: (shape, dtype, memory). memory is "vmem" or "smem"; DMA semaphores are omitted."""
    vb = sum(2 * _tile_padded_bytes(s, dt) for s, dt, mem in blocks if mem == "vmem")
    sb = sum(2 * 4 * int(np.prod(s)) for s, dt, mem in blocks if mem == "smem")
    vs = sum(_tile_padded_bytes(s, dt) for s, dt, mem in scratch if mem == "vmem")
    ss = sum(4 * int(np.prod(s)) for s, dt, mem in scratch if mem == "smem")
    return Footprint(vb, vs, sb, ss)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One pallas_call: the callable and its on-chip footprint (for reports)."""

    call: object
    footprint: Footprint
