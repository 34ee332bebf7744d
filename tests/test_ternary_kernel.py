"""Ternary (packed) matmuls: the XLA path against a float64 numpy statement, the Pallas kernel
(interpreted) against the XLA path, its TPU AOT compile without a TPU, and the input errors.

Tolerances are element-wise rounding bounds: with ``a = |x| @ |W|`` (float64), a float32
accumulation of K terms is off by at most ``K * eps32 * a``; a weight rounded to the compute
dtype (per-group dequantization in bfloat16) adds ``eps * a``; the output cast adds
``eps_out * |y|``. A swapped plane, a wrong scale row or a dropped tile is far outside them."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.quant import pack_rows
from mcpm_kernels.ternary import (pallas_supported, ternary_matmul, ternary_matmul_pallas,
                                  ternary_matmul_xla)

EPS32 = float(np.finfo(np.float32).eps)
EPS_BF16 = float(jnp.finfo(jnp.bfloat16).eps)


def make(m, k, n, g, dtype, fmt="tq2", seed=0, lead=()):
    """x, packed bytes, scale, and the float64 q [K, N] and W [K, N] they stand for."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
    if g is None:
        scale = np.array([[rng.uniform(0.5, 2.0)]], np.float32)
        w = q.astype(np.float64) * float(scale[0, 0])
    else:
        scale = rng.uniform(0.1, 2.0, size=(k // g, n)).astype(np.float32)
        w = q.astype(np.float64) * np.repeat(scale.astype(np.float64), g, axis=0)
    x = jnp.asarray(rng.standard_normal(lead + (m, k)).astype(np.float32), dtype)
    return x, jnp.asarray(pack_rows(q, fmt)), jnp.asarray(scale), q, w


def numpy_unpack(packed, k, fmt):
    """Independent statement of the row-planar layout: plane j of byte row r is row j*R + r."""
    b = np.asarray(packed).astype(np.int64)
    per = 4 if fmt == "tq2" else 5
    planes = [((b >> (2 * j)) & 3) if fmt == "tq2" else ((b // 3 ** j) % 3) for j in range(per)]
    return (np.concatenate(planes, axis=0)[:k] - 1).astype(np.float64)


def bound(x, w, k, eps_w, eps_out, y):
    a = np.abs(np.asarray(x, np.float64)) @ np.abs(w)
    return (k * EPS32 + eps_w) * a + eps_out * np.abs(y) + 1e-30


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("g", [None, 9], ids=["per_tensor", "g9"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_xla_matches_float64_numpy(fmt, g, dtype):
    m, k, n = 6, 45, 33                                       # K odd: planes end in padding
    x, packed, scale, q, w = make(m, k, n, g, dtype, fmt)
    assert np.array_equal(numpy_unpack(packed, k, fmt), q)    # the bytes are what we think
    deq = numpy_unpack(packed, k, fmt) * (float(scale[0, 0]) if g is None else
                                          np.repeat(np.asarray(scale, np.float64), g, axis=0))
    want = np.asarray(x, np.float64) @ deq
    got = ternary_matmul_xla(x, packed, scale, k, fmt)
    assert got.dtype == dtype and got.shape == (m, n)
    eps = EPS32 if dtype == jnp.float32 else EPS_BF16
    tol = bound(x, w, k, 0.0 if g is None else eps, eps, want)
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= tol), float((err / tol).max())


CASES = [  # m, k, n, g, dtype, kwargs
    (1, 510, 256, None, jnp.bfloat16, dict(block_n=128, block_r=128)),   # decode, K % 4 != 0
    (5, 1000, 300, None, jnp.float32, dict(block_n=128, block_r=128)),   # R, N padded
    (8, 1024, 256, 128, jnp.bfloat16, dict(block_n=128, block_r=256)),  # tile groups (2/tile)
    (3, 2048, 128, 256, jnp.float32, dict(block_n=128, block_r=128)),   # row groups, 2 tiles/g
    (20, 768, 128, 64, jnp.bfloat16, dict(block_m=16, block_n=128, block_r=128)),  # R padded
    (16, 256, 128, 32, jnp.float32, dict(block_m=8, block_n=128, block_r=128)),    # 2 M tiles
    (64, 512, 256, None, jnp.bfloat16, {}),                                # prefill, defaults
]


@pytest.mark.parametrize("m,k,n,g,dtype,kw", CASES,
                         ids=[f"m{c[0]}k{c[1]}n{c[2]}g{c[3]}{jnp.dtype(c[4]).name}"
                              for c in CASES])
def test_pallas_interpret_matches_xla(m, k, n, g, dtype, kw):
    x, packed, scale, _, w = make(m, k, n, g, dtype, seed=m + k)
    got = ternary_matmul_pallas(x, packed, scale, k, interpret=True, **kw)
    want = ternary_matmul_xla(x, packed, scale, k)
    assert got.dtype == dtype and got.shape == (m, n)
    eps = EPS32 if dtype == jnp.float32 else EPS_BF16
    want64 = np.asarray(want, np.float64)
    # both sides' accumulation and output rounding, and the XLA side's weight rounding
    tol = 2 * bound(x, w, k, 0.0 if g is None else eps, eps, want64)
    err = np.abs(np.asarray(got, np.float64) - want64)
    assert np.all(err <= tol), float((err / tol).max())


def test_dispatch_leading_dims_and_auto():
    k, n = 300, 128
    x, packed, scale, _, w = make(4, k, n, None, jnp.float32, lead=(2,))
    want = ternary_matmul_xla(x.reshape(-1, k), packed, scale, k).reshape(2, 4, n)
    got = ternary_matmul(x, packed, scale, k, impl="pallas", interpret=True)
    assert got.shape == (2, 4, n)
    tol = 2 * bound(x.reshape(-1, k), w, k, 0.0, EPS32, np.asarray(want).reshape(-1, n))
    assert np.all(np.abs(np.asarray(got - want).reshape(-1, n)) <= tol)
    auto = ternary_matmul(x, packed, scale, k)                # CPU: the XLA path, bit for bit
    assert jax.default_backend() != "tpu"
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ternary_matmul_xla(x, packed,
                                                                                  scale, k)))
    tq1 = ternary_matmul(x, jnp.asarray(pack_rows(np.zeros((k, n), np.int8), "tq1")), scale, k,
                         fmt="tq1")
    assert tq1.shape == (2, 4, n) and not np.any(np.asarray(tq1))


def test_bad_inputs():
    k, n = 100, 128
    x, packed, scale, _, _ = make(2, k, n, None, jnp.float32)
    with pytest.raises(ValueError, match=r"expected \[25, N\]"):
        ternary_matmul(x, packed[:24], scale, k, impl="xla")
    with pytest.raises(ValueError, match=r"expected \[20, N\]"):    # tq2 bytes read as tq1
        ternary_matmul(x, packed, scale, k, fmt="tq1", impl="xla")
    with pytest.raises(ValueError, match="does not end in k=100"):
        ternary_matmul(x[:, :99], packed, scale, k)
    with pytest.raises(ValueError, match="unknown ternary packing format"):
        ternary_matmul(x, packed, scale, k, fmt="tq3")
    with pytest.raises(ValueError, match="unknown impl"):
        ternary_matmul(x, packed, scale, k, impl="cuda")
    with pytest.raises(ValueError, match=r"scale of shape \(3, 128\)"):
        ternary_matmul(x, packed, jnp.ones((3, n)), k)
    p1 = jnp.asarray(pack_rows(np.zeros((k, n), np.int8), "tq1"))
    with pytest.raises(ValueError, match="tq2 .2-bit. packing only"):
        ternary_matmul(x, p1, scale, k, fmt="tq1", impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="backend is 'cpu'.*interpret=True"):
        ternary_matmul(x, packed, scale, k, impl="pallas")
    # per-group layouts the kernel refuses (the XLA path takes them)
    xg, pg, sg, _, _ = make(2, 1000, n, 8, jnp.float32)         # R = 250, g = 8: straddles
    with pytest.raises(ValueError, match=r"g=8 .*R=250 .*R % g == 0"):
        ternary_matmul_pallas(xg, pg, sg, 1000, interpret=True)
    assert not pallas_supported(xg, pg, sg, 1000)
    xg, pg, sg, _, _ = make(2, 1024, n, 4, jnp.float32)         # g = 4: below a sublane tile
    with pytest.raises(ValueError, match="g=4 .*multiple of 8"):
        ternary_matmul_pallas(xg, pg, sg, 1024, interpret=True)
    with pytest.raises(ValueError, match="block_r=100 must be a positive multiple of 128"):
        ternary_matmul_pallas(x, packed, scale, k, block_r=100, interpret=True)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        ternary_matmul_pallas(x.astype(jnp.float16), packed, scale, k, interpret=True)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[test]'): no TPU topology "
                           "descriptions to compile against")
@pytest.mark.parametrize("topology,m,g,block_r", [
    ("v5e:1x1", 8, None, 512), ("v5e:1x1", 8, 128, 512), ("v5e:1x1", 8, 128, 128),
    ("v5e:1x1", 512, None, 512), ("v5p:1x1x1", 8, None, 512)],
    ids=["v5e-decode", "v5e-decode-g128-tile", "v5e-decode-g128-row", "v5e-prefill",
         "v5p-decode"])
def test_compiles_for_tpu(topology, m, g, block_r):
    """Mosaic checks the tiling and lowers every op at this compile. The decode shape of a
    hidden-1024 projection (N = 4096) and a 512-token prefill, bfloat16; group scales of 128
    rows both ways (4 groups in a 512-row tile, one group per 128-row tile)."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    k, n = 1024, 4096
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    shapes = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
              jax.ShapeDtypeStruct((k // 4, n), jnp.uint8),
              jax.ShapeDtypeStruct((1, 1) if g is None else (k // g, n), jnp.float32)]
    lowered = jax.jit(lambda x, p, s: ternary_matmul_pallas(x, p, s, k, block_r=block_r),
                      in_shardings=(rep,) * 3).trace(*shapes).lower()
    assert lowered.as_text().count("@tpu_custom_call") == 1
    mem = lowered.compile().memory_analysis()
    assert mem.output_size_in_bytes == m * n * 2
    # Any unpacked copy of the weight in HBM (int8 codes or bfloat16 values, whole or in
    # column blocks of more than a quarter) would take more than the packed weight's K*N/4
    # bytes; the only HBM temporaries allowed are the padded x and the broadcast scale row.
    assert mem.temp_size_in_bytes < k * n // 4, mem
