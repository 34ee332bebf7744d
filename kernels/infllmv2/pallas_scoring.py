"""InfLLM v2 stage 1 (kernel relevance + block max-pool) as one Pallas TPU (Mosaic) kernel.

``block_scores_pallas(q, kc, ...)`` equals ``block_scores(kernel_scores(q, kc, ...), ...)`` of
:mod:`mcpm_kernels.infllmv2.reference` for queries at positions ``q_start + arange(T)``, without
ever writing the per-head ``[T, C]`` probabilities to HBM: the only array the kernel writes is
the ``[B, K, T, M]`` block scores.

Letters: B batch, T queries, N query heads, K kv heads, G = N / K, D head_dim, C kernels, M key
blocks, per = block_size / kernel_stride kernels per block.

Design
------
Grid ``(B, K, T / tq, 2 * nk)``: one query tile of ``tq`` tokens of one kv group sweeps the
kernel tiles (``Ck = per * Mt`` kernels, ``Mt`` blocks) twice along the last, sequential axis.

* The q tile ``[tq, G, D]`` is read straight from ``q [B, T, N, D]`` (no transpose or reshape in
  HBM) and folded in VMEM into ``tq * G`` rows, token-major then head, so one matmul
  ``[tq*G, D] x [Ck, D]^T`` gives the logits of all G heads (scaled by 1/sqrt(D), float32).
  G must fill whole sublane tiles (8 for 32-bit q, 16 for 16-bit); a smaller G (not the 8B's
  16) is padded with zero heads in HBM (a copy of q) that the group sum leaves out. A T that is
  not a multiple of ``tq`` is padded too.
* Sweep 1 (``j < nk``): logits masked to the visible kernels are folded into an online max /
  sum of exp per (token, head) (float32, VMEM scratch ``[tq, G, 1]``); at the switch to sweep 2
  they become the log-sum-exp (+inf for a row that sees no kernel).
* Sweep 2 (``j >= nk``): the logits are recomputed, ``exp(logit - lse)`` (0 where invisible; 0
  for a row with no visible kernel) is summed over the G heads into ``[tq, Ck]``, kernels that
  do not exist become -inf, and the tile is max-pooled onto its ``Mt`` blocks in-kernel.
* Pooling without lane shuffles: the wrapper permutes the kernels inside each tile so that
  column ``p * Mt + m`` holds kernel ``per * m + p``; block m's own kernels are then the ``per``
  aligned lane slices ``[:, p*Mt:(p+1)*Mt]`` (elementwise max), and the kernel before the block
  (``per * m - 1``, the first of its ``per + 1`` pool window) is the last slice rolled by one
  lane, its column 0 coming from the previous kernel tile (carried in VMEM scratch; -inf before
  the first tile).
* Causality: kernel tiles that no query of the tile can see are skipped (no matmul, and their
  kc block index is clamped to the last useful tile, so no DMA either); their blocks still get
  0 (existing kernels) or -inf (none), exactly like the reference.
* The output block index is constant during sweep 1 and equals the first sweep-2 block, so each
  output tile is written back to HBM once, after it is computed. Beside the inputs, HBM holds
  the output ``[B, K, T, M_pad]`` f32 (sliced to M when ``M_pad > M``) and a permuted, padded
  copy of kc ``[B, K, C_pad, D]`` (1/16 of the keys for stride 16) with its kernel end
  positions ``[1, C_pad]`` int32.

``q_start`` (a traced scalar is fine) is passed by scalar prefetch; it drives the visibility
mask and the kc index map. The matmul runs in ``promote_types(q.dtype, kc.dtype)`` with float32
accumulation: pass bfloat16 kc with bfloat16 q for MXU speed on TPU (the reference's
``compress_keys`` returns float32; a float32 kc makes every tile an f32 matmul).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NO_KERNEL = 2 ** 30        # "end position" of a padded (non-existent) kernel: never visible
_M_INIT = -1e30             # finite running-max start: exp(m_prev - m_new) never sees -inf - -inf


@dataclasses.dataclass(frozen=True)
class ScoringTiles:
    """Tile sizes. ``queries``: query tokens per tile (rows; multiple of 8, 128 on TPU is
    natural). ``blocks``: key blocks per output tile (lanes; multiple of 128 on TPU), so a kernel
    tile holds ``blocks * block_size / kernel_stride`` kernels."""
    queries: int = 128
    blocks: int = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vmem_bytes(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype, kernels_per_block: int,
               tiles: ScoringTiles = ScoringTiles()) -> dict:
    """VMEM the kernel asks for: blocks double-buffered, scratch once, each padded to Mosaic's
    tiles of the last two dims ((8, 128) for 32-bit, (16, 128) for 16-bit). The intermediates
    Mosaic keeps for the logits ``[tq*G, Ck]`` f32 come on top (listed, not in the total)."""
    g = num_q_heads // num_kv_heads
    tq, mt = tiles.queries, tiles.blocks
    ck = kernels_per_block * mt
    isz = jnp.dtype(dtype).itemsize
    g_pad = _round_up(g, 8 * 4 // isz)                         # heads padded as in the wrapper

    def padded(lead, rows, cols, itemsize):
        sub = 8 * (4 // itemsize)
        return lead * _round_up(rows, sub) * _round_up(cols, 128) * itemsize

    blocks = {
        "q [tq, G, D]": padded(tq, g_pad, head_dim, isz),
        "kc [Ck, D]": padded(1, ck, head_dim, isz),
        "kernel end positions [1, Ck] int32": padded(1, 1, ck, 4),
        "out [tq, Mt] f32": padded(1, tq, mt, 4),
    }
    scratch = {
        "running max / lse [tq, G, 1] f32": padded(tq, g_pad, 1, 4),
        "running sum [tq, G, 1] f32": padded(tq, g_pad, 1, 4),
        "group sum [tq, Ck] f32": padded(1, tq, ck, 4),
        "carry [tq, 1] f32": padded(1, tq, 1, 4),
    }
    total = 2 * sum(blocks.values()) + sum(scratch.values())
    return {"blocks (x2 buffers)": blocks, "scratch": scratch, "total": total,
            "logits [tq*G, Ck] f32 (one intermediate)": padded(1, tq * g_pad, ck, 4)}


def _scoring_kernel(qs_ref, kend_ref, q_ref, kc_ref, out_ref, m_ref, l_ref, acc_ref, carry_ref,
                    *, g: int, g_real: int, d: int, tq: int, ck: int, mt: int, per: int,
                    nk: int, stride: int, kernel_size: int, c: int, scale: float, compute_dtype):
    i, j = pl.program_id(2), pl.program_id(3)
    q_start = qs_ref[0]
    jt = jnp.where(j < nk, j, j - nk)                          # kernel tile of this step
    pos_max = q_start + (i + 1) * tq - 1
    tile_visible = (jt * ck < c) & (jt * ck * stride + kernel_size - 1 <= pos_max)

    def masked_logits():
        """``[tq, G, Ck]`` f32 logits of the tile's G heads, -inf where the kernel is invisible."""
        q = q_ref[...].astype(compute_dtype).reshape(tq * g, d)   # rows: token-major, then head
        kc = kc_ref[...].astype(compute_dtype)
        s = jax.lax.dot_general(q, kc, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        pos = q_start + i * tq + jax.lax.broadcasted_iota(jnp.int32, (tq, ck), 0)
        bias = jnp.where(kend_ref[...] <= pos, 0.0, -jnp.inf)   # [tq, Ck]
        return s.reshape(tq, g, ck) + bias[:, None, :]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _M_INIT, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when((j < nk) & tile_visible)
    def _sweep1():                                             # online softmax statistics
        s = masked_logits()
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=2, keepdims=True))
        l_ref[...] = (l_prev * jnp.exp(m_prev - m_new)
                      + jnp.sum(jnp.exp(s - m_new), axis=2, keepdims=True))
        m_ref[...] = m_new

    @pl.when(j == nk)
    def _start_sweep2():
        carry_ref[...] = jnp.full(carry_ref.shape, -jnp.inf, jnp.float32)
        l = l_ref[...]                                         # from now on m_ref holds the LSE
        m_ref[...] = jnp.where(l > 0, m_ref[...] + jnp.log(l), jnp.inf)  # +inf: none visible

    @pl.when((j >= nk) & tile_visible)
    def _group_sum():                                          # sum over G of the probabilities
        p = jnp.exp(masked_logits() - m_ref[...])
        if g_real != g:                                        # padded heads count for nothing
            p = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, g, 1), 1) < g_real, p, 0.0)
        acc_ref[...] = jnp.sum(p, axis=1)

    @pl.when((j >= nk) & jnp.logical_not(tile_visible))
    def _nothing_visible():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j >= nk)
    def _pool():
        exists = kend_ref[...] < _NO_KERNEL                    # [1, Ck]
        s = jnp.where(exists, acc_ref[...], -jnp.inf)         # [tq, Ck], columns permuted
        own = s[:, 0:mt]                                       # kernel per*m + p at p*Mt + m
        for p in range(1, per):
            own = jnp.maximum(own, s[:, p * mt:(p + 1) * mt])
        last = s[:, (per - 1) * mt:per * mt]                   # kernel per*m + per - 1
        before = pltpu.roll(last, 1, 1)                        # column m: kernel per*m - 1
        col = jax.lax.broadcasted_iota(jnp.int32, (tq, mt), 1)
        before = jnp.where(col == 0, carry_ref[...], before)
        out_ref[...] = jnp.maximum(own, before)
        carry_ref[...] = last[:, mt - 1:mt]


def block_scores_pallas(q_btnd: jax.Array, kc_bckd: jax.Array, *, kernel_size: int,
                        kernel_stride: int, block_size: int, num_blocks: int,
                        q_start: int | jax.Array = 0, interpret=None,
                        tiles: ScoringTiles = ScoringTiles()) -> jax.Array:
    """Block scores ``[B, K, T, num_blocks]`` float32 of queries ``q [B, T, N, D]`` at positions
    ``q_start + arange(T)`` against compressed keys ``kc [B, C, K, D]`` (of the whole key
    sequence). Equals ``block_scores(kernel_scores(q, kc, kernel_size, kernel_stride,
    q_start + arange(T)), num_blocks, block_size, kernel_stride)``.

    ``interpret``: None = interpret on CPU; True / ``pltpu.InterpretParams(...)`` also accepted.
    """
    b, t, n, d = q_btnd.shape
    c, kv = kc_bckd.shape[1], kc_bckd.shape[2]
    if n % kv or kc_bckd.shape[0] != b or kc_bckd.shape[3] != d:
        raise ValueError(f"shapes do not match: q {q_btnd.shape}, kc {kc_bckd.shape}")
    if block_size % kernel_stride:
        raise ValueError("block_size must be a multiple of kernel_stride")
    if tiles.queries % 8 or tiles.blocks % 8:
        raise ValueError(f"tile sizes must be multiples of 8, got {tiles}")
    g, per, m = n // kv, block_size // kernel_stride, num_blocks
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if c == 0 or t == 0 or m == 0:                             # no kernels: every block -inf
        return jnp.full((b, kv, t, m), -jnp.inf, jnp.float32)

    tq = min(tiles.queries, _round_up(t, 8))
    t_pad = _round_up(t, tq)
    mt = tiles.blocks
    ck = per * mt
    nk_c = -(-c // ck)                                         # tiles holding real kernels
    nk = max(nk_c, -(-m // mt))                                # softmax needs every kernel
    m_pad, c_pad = nk * mt, nk * ck

    # q block [tq, G, D]: G must fill whole (sublane) tiles (8 rows of 32 bits, 16 of 16 bits)
    # for the block and the in-VMEM fold to [tq*G, D]; otherwise pad each group with zero
    # heads (an HBM copy of q; the 8B's G = 16 needs none), masked out of the group sum
    sub = 8 * 4 // jnp.dtype(q_btnd.dtype).itemsize
    g_pad = _round_up(g, sub)
    q = q_btnd
    if g_pad != g:
        q = jnp.pad(q.reshape(b, t, kv, g, d), ((0, 0), (0, 0), (0, 0), (0, g_pad - g), (0, 0)))
        q = q.reshape(b, t, kv * g_pad, d)
    if t_pad != t:
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))

    def permute(x, axis):                                      # kernel per*m + p -> p*Mt + m
        shp = x.shape
        x = x.reshape(shp[:axis] + (nk, mt, per) + shp[axis + 1:])
        x = jnp.swapaxes(x, axis + 1, axis + 2)
        return x.reshape(shp)

    kc = jnp.pad(kc_bckd, ((0, 0), (0, c_pad - c), (0, 0), (0, 0)))
    kc = permute(kc, 1).transpose(0, 2, 1, 3)                  # [B, K, c_pad, D]
    cidx = jnp.arange(c_pad, dtype=jnp.int32)
    kend = jnp.where(cidx < c, cidx * kernel_stride + kernel_size - 1, _NO_KERNEL)
    kend = permute(kend, 0).reshape(1, c_pad).astype(jnp.int32)
    qs = jnp.asarray(q_start, jnp.int32).reshape(1)

    def kc_tile(i, j, qs_ref):                                 # clamp to the last useful tile
        jt = jnp.where(j < nk, j, j - nk)
        pos_max = qs_ref[0] + (i + 1) * tq - 1
        last = jax.lax.div(jnp.maximum(pos_max - kernel_size + 1, 0), ck * kernel_stride)
        return jnp.minimum(jt, jnp.minimum(last, nk_c - 1))

    grid = (b, kv, t_pad // tq, 2 * nk)
    in_specs = [
        pl.BlockSpec((1, ck), lambda bi, ki, i, j, qs_ref: (0, kc_tile(i, j, qs_ref))),
        pl.BlockSpec((None, tq, g_pad, d), lambda bi, ki, i, j, qs_ref: (bi, i, ki, 0)),
        pl.BlockSpec((None, None, ck, d),
                     lambda bi, ki, i, j, qs_ref: (bi, ki, kc_tile(i, j, qs_ref), 0)),
    ]
    out_spec = pl.BlockSpec((None, None, tq, mt),
                            lambda bi, ki, i, j, qs_ref: (bi, ki, i, jnp.maximum(j - nk, 0)))
    scratch = [pltpu.VMEM((tq, g_pad, 1), jnp.float32), pltpu.VMEM((tq, g_pad, 1), jnp.float32),
               pltpu.VMEM((tq, ck), jnp.float32), pltpu.VMEM((tq, 1), jnp.float32)]
    kernel = functools.partial(
        _scoring_kernel, g=g_pad, g_real=g, d=d, tq=tq, ck=ck, mt=mt, per=per, nk=nk,
        stride=kernel_stride, kernel_size=kernel_size, c=c, scale=1.0 / math.sqrt(d),
        compute_dtype=jnp.promote_types(q_btnd.dtype, kc_bckd.dtype))
    work = b * kv * g_pad * t_pad * c_pad                      # upper bound (no causal skip)
    cost = pl.CostEstimate(
        flops=4 * work * d, transcendentals=2 * work,
        bytes_accessed=q.size * q.dtype.itemsize + 2 * kc.size * kc.dtype.itemsize
        * (t_pad // tq) + b * kv * t_pad * m_pad * 4)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct((b, kv, t_pad, m_pad), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(qs, kend, q, kc)
    if t_pad != t or m_pad != m:
        out = out[:, :, :t, :m]
    return out
