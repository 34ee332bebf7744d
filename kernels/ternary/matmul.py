"""Matmuls against ternary weights kept in their packed bytes (BitCPM4 inference).

A ternary weight ``W [K, N]`` (K = input axis) is ``q * scale`` with ``q`` in {-1, 0, 1}, stored
row-planar by :func:`mcpm.quant.pack_rows` as uint8 ``packed [R, N]``. For "tq2", R = ceil(K/4)
and byte ``[r, n]`` holds rows ``r, R + r, 2R + r, 3R + r`` of column n as 2-bit codes ``q + 1``
at bits 0-1, 2-3, 4-5, 6-7 (plane j = bits 2j..2j+1 = weight rows ``[jR, (j+1)R)``); "tq1"
keeps five rows per byte in base 3. Scales (:mod:`mcpm.quant.ternary`): per tensor
``scale [1, 1]`` float32, or per group of g consecutive input rows ``scale [K // g, N]``
(scale row ``k // g`` for weight row k).

Why a kernel: decode is bound by reading weights, so the packed bytes must be read once and the
``[K, N]`` matrix (8x the packed bytes in bfloat16) must never exist in HBM. The XLA path leaves
that to XLA's fusion of the unpack into the matmul operand (which the TPU AOT compile at
1024 x 4096 does do, with tiling of XLA's choosing); the Pallas kernel states it: it unpacks
tile by tile in VMEM, with the tile sizes, scale handling and padding below.

* :func:`ternary_matmul_xla`: plain jax (unpack, scale, one matmul); any backend, tq2 and tq1.
* :func:`ternary_matmul_pallas`: the Pallas TPU (Mosaic) kernel, tq2 only.
* :func:`ternary_matmul`: the dispatcher ("auto" = the kernel on TPU where it applies).

Kernel design
-------------
Grid ``(M / bm, N / bn, R / br)``, the last axis the reduction ("arbitrary"), a float32 VMEM
accumulator ``[bm, bn]``. Step ``(i, n, r)`` reads one packed tile ``[br, bn]`` uint8 and the
four x tiles that meet its planes: plane j of byte rows ``[r*br, (r+1)*br)`` is weight rows
``j*R + r*br ...``, so x (K zero-padded to 4R, each plane's R zero-padded to a multiple of br,
viewed as ``[M, 4 * R_pad]``; no copy when nothing needs padding) is passed four times, plane
j's BlockSpec taking column block ``j * R_pad / br + r``. In VMEM the bytes are widened to int32,
plane j is ``((p >> 2j) & 3) - 1``, converted to x's dtype (exact: -1, 0, 1) and multiplied on
the MXU against x's tile with float32 accumulation. Padded weight rows meet zero x columns,
padded columns and rows of the output are sliced off.

Scales, per layout:

* per tensor: one multiply of the accumulator by the scale at the last reduction step.
* per group, ``g`` a multiple of ``br`` ("row" groups): a tile's rows of one plane lie in one
  group, so its product is multiplied by that group's ``[1, bn]`` scale row before it is added
  to the accumulator (cheap: ``[bm, bn]`` per plane).
* per group, ``br`` a multiple of ``g`` ("tile" groups): the tile holds ``br / g`` groups per
  plane; the unpacked plane (float32) is multiplied by its ``[br / g, bn]`` scales (broadcast over
  each group's g rows) before the cast and the matmul. Needs g a multiple of 8 (whole sublane
  tiles for the in-VMEM reshape ``[br, bn] -> [br / g, g, bn]``).

The wrapper views the group scales as ``[4, groups per plane, rows per block, N]`` so that one
block brings all four planes' rows; on TPU XLA may lay that view out as a copy of the scale
(an HBM temporary of the scale's size, 1/8 of the packed bytes at g = 128).

Both group rules need ``R % g == 0`` (no group straddles two planes); other layouts raise
ValueError. The rule is chosen automatically: "row" when ``g >= block_r`` and g is a multiple
of 128 (br = the largest multiple of 128 dividing g, at most block_r), else "tile" (br = a
multiple of ``lcm(g, 128)``, at most block_r unless lcm(g, 128) itself is larger and g < 128).

Tiling rules (TPU): block dims are multiples of (8, 128) for 32-bit data, (16, 128) for 16-bit
x / output, (32, 128) for the uint8 packed tile; here ``bn`` and ``br`` are multiples of 128 and
``bm`` of 8 (float32 x) or 16 (bfloat16 x); M, N and R are padded up to whole tiles (M=1..8
decode becomes one 8 / 16-row tile). The block sizes given are upper bounds: the wrapper shrinks
them to the (padded) array and prefers a divisor of the dimension (no padding copy) among
multiples of 128 down to half the requested size.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mcpm.quant.pack import packed_rows, unpack_rows

FORMATS = ("tq2", "tq1")
IMPLS = ("auto", "xla", "pallas")
_LANE = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_inputs(x, packed, scale, k: int, fmt: str):
    """Validate shapes; return (R, N, g) with g None for a per-tensor scale."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ternary packing format {fmt!r}; expected one of {FORMATS}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"k (the weight's input dimension) must be positive, got {k}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x of shape {tuple(x.shape)} does not end in k={k} (x is [..., K])")
    r = packed_rows(k, fmt)
    if packed.ndim != 2 or packed.shape[0] != r:
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not fit k={k} in "
                         f"{fmt}: expected [{r}, N] (R = ceil(k / {4 if fmt == 'tq2' else 5}))")
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed weight must be uint8, got {packed.dtype}")
    n = packed.shape[1]
    if scale.ndim != 2:
        raise ValueError(f"scale of shape {tuple(scale.shape)}: expected [1, 1] (per tensor) "
                         f"or [k // g, {n}] (per group)")
    if scale.shape == (1, 1):
        return r, n, None
    groups = scale.shape[0]
    if scale.shape[1] != n or groups == 0 or k % groups:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit a [{k}, {n}] weight: "
                         f"expected [1, 1] or [k // g, {n}] with g dividing k={k}")
    return r, n, k // groups


def ternary_matmul_xla(x, packed, scale, k: int, fmt: str = "tq2"):
    """``x [..., K] @ W`` in plain jax for ``W = q * scale`` packed row-planar (module doc).

    q is unpacked in x's dtype (exact). Per tensor the float32 product is multiplied by the scale;
    per group the weight is dequantized in float32 (``jnp.repeat`` of the scale rows) and cast to
    x's dtype before the matmul. Accumulates in float32, returns x's dtype."""
    x = jnp.asarray(x)
    packed = jnp.asarray(packed)
    scale = jnp.asarray(scale, jnp.float32)
    _, _, g = _check_inputs(x, packed, scale, k, fmt)
    q = unpack_rows(packed, k, fmt, x.dtype)                   # [K, N] in {-1, 0, 1}
    if g is None:
        y = jnp.matmul(x, q, preferred_element_type=jnp.float32) * scale[0, 0]
    else:
        w = (q.astype(jnp.float32) * jnp.repeat(scale, g, axis=0)).astype(x.dtype)
        y = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _fit(dim: int, cap: int, align: int) -> int:
    """Block size for an axis of length dim: a multiple of align, at most max(cap, align),
    covering dim when it fits; else a divisor of dim within [cap/2, cap] when there is one."""
    cap = max(align, cap // align * align)
    if dim <= cap:
        return _round_up(dim, align)
    if dim % align == 0:
        for b in range(cap, cap // 2 - 1, -align):
            if b > 0 and dim % b == 0:
                return b
    return cap


def _group_tiles(r: int, g: int, block_r: int) -> tuple[str, int]:
    """The per-group scale rule and the reduction tile br (see the module doc)."""
    if r % g:
        raise ValueError(
            f"per-group scales with g={g} need each of the 4 planes of R={r} byte rows to hold "
            f"whole groups (R % g == 0); this weight's groups straddle planes: use the XLA path "
            f"(impl='xla') or a group size dividing {r}")
    if g >= block_r and g % _LANE == 0:
        br = max(b for b in range(_LANE, min(block_r, g) + 1, _LANE) if g % b == 0)
        return "row", br
    if g % 8:
        raise ValueError(
            f"per-group scales with g={g} smaller than a reduction tile (block_r={block_r}) need "
            f"g to be a multiple of 8 (whole sublane tiles in VMEM); got g={g}, R={r}")
    unit = g * _LANE // math.gcd(g, _LANE)                     # lcm(g, 128)
    if unit > max(block_r, _LANE) and g >= _LANE:
        raise ValueError(
            f"per-group scales with g={g}: no reduction tile of at most block_r={block_r} rows is "
            f"a multiple of 128 and of g; raise block_r to {unit} or use impl='xla'")
    br = _fit(_round_up(r, unit), max(unit, block_r // unit * unit), unit)
    return "tile", br


def _kernel(x0_ref, x1_ref, x2_ref, x3_ref, p_ref, s_ref, o_ref, acc_ref, *, mode: str,
            nr: int, br: int, bn: int, g: int | None, compute_dtype):
    r = pl.program_id(2)

    @pl.when(r == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    p = p_ref[...].astype(jnp.int32)                           # [br, bn] bytes
    acc = acc_ref[...]
    for j, x_ref in enumerate((x0_ref, x1_ref, x2_ref, x3_ref)):
        q = ((p >> (2 * j)) & 3) - 1                           # plane j: weight rows j*R + ...
        if mode == "tile":
            s = s_ref[j]                                       # [br / g, bn] f32
            w = q.astype(jnp.float32).reshape(br // g, g, bn) * s[:, None, :]
            w = w.reshape(br, bn).astype(compute_dtype)
        else:
            w = q.astype(jnp.float32).astype(compute_dtype)
        d = jax.lax.dot_general(x_ref[...], w, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        if mode == "row":
            d = d * s_ref[j]                                   # [1, bn] f32
        acc = acc + d
    acc_ref[...] = acc

    @pl.when(r == nr - 1)
    def _finish():
        out = acc_ref[...]
        if mode == "tensor":
            out = out * s_ref[...]                             # [1, bn] f32 (one value)
        o_ref[...] = out.astype(o_ref.dtype)


def ternary_matmul_pallas(x, packed, scale, k: int, *, block_m: int | None = None,
                          block_n: int = 512, block_r: int = 512, interpret=False):
    """``x [M, K] @ W`` for a tq2 row-planar packed ternary weight, as one Pallas TPU kernel.

    Layout, scale rules and tiling: module doc. ``x`` float32 or bfloat16 (the matmul runs in
    x's dtype, float32 accumulation, output in x's dtype). ``block_m`` defaults to M rounded up
    to the sublane tile, at most 256 (decode M=1..8: one tile); ``block_n`` / ``block_r`` are
    upper bounds (multiples of 128). ``interpret``: run in the Pallas interpreter (CPU tests)."""
    x = jnp.asarray(x)
    packed = jnp.asarray(packed)
    scale = jnp.asarray(scale, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"ternary_matmul_pallas expects x [M, K], got shape {tuple(x.shape)} "
                         "(ternary_matmul flattens leading dims)")
    r, n, g = _check_inputs(x, packed, scale, k, "tq2")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"ternary_matmul_pallas supports float32 and bfloat16 x, got {x.dtype}")
    for name, b in (("block_n", block_n), ("block_r", block_r)):
        if b <= 0 or b % _LANE:
            raise ValueError(f"{name}={b} must be a positive multiple of {_LANE} (TPU lanes)")
    if block_m is not None and (block_m <= 0 or block_m % 8):
        raise ValueError(f"block_m={block_m} must be a positive multiple of 8 (TPU sublanes)")
    m = x.shape[0]
    sub = 8 * 4 // x.dtype.itemsize                            # 8 rows f32, 16 rows bf16
    bm = _round_up(min(block_m or 256, _round_up(m, sub)), sub)
    bn = _fit(n, block_n, _LANE)
    if g is None:
        mode, br = "tensor", _fit(r, block_r, _LANE)
    else:
        mode, br = _group_tiles(r, g, block_r)
    m_pad, n_pad, r_pad = _round_up(m, bm), _round_up(n, bn), _round_up(r, br)
    nr = r_pad // br

    xp = x
    if k != 4 * r or r_pad != r:                               # planes of R_pad columns
        xp = jnp.pad(xp, ((0, 0), (0, 4 * r - k))).reshape(m, 4, r)
        xp = jnp.pad(xp, ((0, 0), (0, 0), (0, r_pad - r))).reshape(m, 4 * r_pad)
    if m_pad != m:
        xp = jnp.pad(xp, ((0, m_pad - m), (0, 0)))
    pk = packed
    if r_pad != r or n_pad != n:
        pk = jnp.pad(pk, ((0, r_pad - r), (0, n_pad - n)))
    if mode == "tensor":
        sp = jnp.broadcast_to(scale.reshape(1, 1), (1, n_pad))
        s_spec = pl.BlockSpec((1, bn), lambda i, jn, rr: (0, jn))
    else:
        sp = jnp.pad(scale, ((0, 4 * r // g - scale.shape[0]), (0, n_pad - n)))
        sp = sp.reshape(4, r // g, n_pad)                      # [plane, group in plane, N]
        if mode == "row":
            sp = sp.reshape(4, r // g, 1, n_pad)
            per = g // br                                      # tiles per group
            s_spec = pl.BlockSpec((4, None, 1, bn),
                                  lambda i, jn, rr: (0, jax.lax.div(rr, per), 0, jn))
        else:
            sp = jnp.pad(sp, ((0, 0), (0, (r_pad - r) // g), (0, 0)))
            sp = sp.reshape(4, nr, br // g, n_pad)
            s_spec = pl.BlockSpec((4, None, br // g, bn), lambda i, jn, rr: (0, rr, 0, jn))

    x_specs = [pl.BlockSpec((bm, br), functools.partial(lambda j, i, jn, rr: (i, j * nr + rr), j))
               for j in range(4)]
    p_spec = pl.BlockSpec((br, bn), lambda i, jn, rr: (rr, jn))
    out_spec = pl.BlockSpec((bm, bn), lambda i, jn, rr: (i, jn))
    kernel = functools.partial(_kernel, mode=mode, nr=nr, br=br, bn=bn, g=g,
                               compute_dtype=x.dtype)
    grid = (m_pad // bm, n_pad // bn, nr)
    cost = pl.CostEstimate(
        flops=2 * m_pad * 4 * r_pad * n_pad, transcendentals=0,
        bytes_accessed=pk.size * grid[0] + xp.size * xp.dtype.itemsize * grid[1]
        + sp.size * 4 * grid[0] + m_pad * n_pad * x.dtype.itemsize)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=grid, in_specs=x_specs + [p_spec, s_spec],
            out_specs=out_spec, scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(xp, xp, xp, xp, pk, sp)
    if m_pad != m or n_pad != n:
        out = out[:m, :n]
    return out


def pallas_supported(x, packed, scale, k: int, fmt: str = "tq2",
                     block_r: int = 512) -> bool:
    """Whether :func:`ternary_matmul_pallas` takes these inputs (format, dtype, scale layout)."""
    try:
        _, _, g = _check_inputs(jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scale), k, fmt)
        if fmt != "tq2" or jnp.asarray(x).dtype not in (jnp.float32, jnp.bfloat16):
            return False
        if g is not None:
            _group_tiles(packed_rows(k, fmt), g, block_r)
    except ValueError:
        return False
    return True


def ternary_matmul(x, packed, scale, k: int, fmt: str = "tq2", impl: str = "auto",
                   interpret=False):
    """``x [..., K] @ W`` for a row-planar packed ternary weight ``W [K, N]`` -> ``[..., N]``.

    ``impl``: "xla" (plain jax, any backend and format), "pallas" (the TPU kernel, tq2; on
    another backend only with ``interpret=True``), "auto" (the kernel on TPU when
    :func:`pallas_supported`, else xla)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    x = jnp.asarray(x)
    _check_inputs(x, jnp.asarray(packed), jnp.asarray(scale), k, fmt)
    if impl == "auto":
        impl = ("pallas" if jax.default_backend() == "tpu"
                and pallas_supported(x, packed, scale, k, fmt) else "xla")
    if impl == "xla":
        return ternary_matmul_xla(x, packed, scale, k, fmt)
    if fmt != "tq2":
        raise ValueError(f"the Pallas ternary kernel reads tq2 (2-bit) packing only, got "
                         f"fmt={fmt!r}: use impl='xla' or repack with pack_rows(q, 'tq2')")
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(f"impl='pallas' compiles a TPU (Mosaic) kernel but the backend is "
                         f"{jax.default_backend()!r}: use impl='xla' or interpret=True")
    lead = x.shape[:-1]
    y = ternary_matmul_pallas(x.reshape(-1, k), packed, scale, k, interpret=interpret)
    return y.reshape(lead + (y.shape[-1],))
