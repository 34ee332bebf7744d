"""mcpm.quant: absmean ternary quantizer, straight-through estimator, tq1/tq2 packing.

The reference quantizer here is a plain float64 numpy loop over matrices/groups/columns,
written independently of mcpm/quant/ternary.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm import quant
from mcpm.config import UserError


# ------------------------------------------------------------------------------------------
# independent reference
def _round_half_even(x: float) -> float:
    return float(np.round(x))          # numpy rounds half to even, like the spec says


def ref_ternarize(w, group_size=None):
    """float64 loops: returns (q int8, scale float64) in the documented layout."""
    w = np.asarray(w, dtype=np.float64)
    one_d = w.ndim == 1
    if one_d:
        w = w[:, None]
    lead = w.shape[:-2]
    n_in, n_out = w.shape[-2:]
    q = np.zeros(w.shape, dtype=np.int8)
    if group_size is None:
        scale = np.zeros(lead + (1, 1))
    else:
        scale = np.zeros(lead + (n_in // group_size, n_out))
    for idx in np.ndindex(*lead):
        m = w[idx]
        if group_size is None:
            s = 0.0
            for v in m.ravel():
                s += abs(v)
            s /= m.size
            scale[idx][0, 0] = s
            for i in range(n_in):
                for o in range(n_out):
                    r = 0.0 if s == 0 else _round_half_even(m[i, o] / s)
                    q[idx][i, o] = max(-1, min(1, int(r)))
        else:
            for j in range(n_in // group_size):
                for o in range(n_out):
                    rows = range(j * group_size, (j + 1) * group_size)
                    s = sum(abs(m[i, o]) for i in rows) / group_size
                    scale[idx][j, o] = s
                    for i in rows:
                        r = 0.0 if s == 0 else _round_half_even(m[i, o] / s)
                        q[idx][i, o] = max(-1, min(1, int(r)))
    if one_d:
        q, scale = q[:, 0], scale[:, 0]
    return q, scale


def _rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _check_against_ref(w, group_size):
    q, s = quant.ternarize(w, group_size)
    rq, rs = ref_ternarize(np.asarray(w, dtype=np.float32), group_size)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6, atol=0)
    # values whose |w/scale| sits within float32 noise of a rounding boundary may differ
    w64 = np.asarray(w, np.float64)
    w2, rs2 = (w64[:, None], rs[:, None]) if w64.ndim == 1 else (w64, rs)
    full = np.repeat(rs2, w2.shape[-2] // rs2.shape[-2], axis=-2)
    ratio = (np.abs(w2) / np.where(full > 0, full, 1)).reshape(w64.shape)
    near = np.abs(ratio - 0.5) < 1e-5
    np.testing.assert_array_equal(np.asarray(q)[~near], rq[~near])
    assert set(np.unique(np.asarray(q))) <= {-1, 0, 1}
    return q, s


# ------------------------------------------------------------------------------------------
# ternarize / dequantize
def test_ternarize_per_tensor_matches_reference():
    w = _rand((24, 10), seed=1)
    q, s = _check_against_ref(w, None)
    assert s.shape == (1, 1)
    assert float(s[0, 0]) == pytest.approx(np.abs(w.astype(np.float64)).mean(), rel=1e-6)
    # a non-trivial mix of all three values
    assert {-1, 0, 1} == set(np.unique(np.asarray(q)).tolist())


def test_ternarize_per_group_matches_reference_with_zero_group():
    w = _rand((16, 6), seed=2)
    w[4:8, 3] = 0.0                     # one all-zero group (group 1, column 3)
    q, s = _check_against_ref(w, 4)
    assert s.shape == (4, 6)
    assert float(s[1, 3]) == 0.0
    assert np.all(np.asarray(q)[4:8, 3] == 0)
    assert np.all(np.isfinite(np.asarray(s)))
    # groups really are separate: scaling one group changes only that group's scale
    w2 = w.copy()
    w2[0:4, 0] *= 10
    _, s2 = quant.ternarize(w2, 4)
    diff = np.asarray(s2) != np.asarray(s)
    assert diff[0, 0] and diff.sum() == 1


def test_ternarize_all_zero_tensor():
    q, s = quant.ternarize(np.zeros((8, 4), np.float32))
    assert float(s[0, 0]) == 0.0 and not np.any(np.asarray(q))
    q, s = quant.ternarize(jnp.zeros((8, 4)), 2)
    assert not np.any(np.asarray(s)) and not np.any(np.asarray(q))
    assert np.all(np.isfinite(np.asarray(quant.dequantize(q, s))))


def test_ternarize_stacked_layers_per_layer_scale_and_groups():
    w = _rand((3, 12, 5), seed=3)
    w[1] *= 7.0                          # layers at very different scales
    w[2] = 0.0                           # an all-zero layer
    _, s = _check_against_ref(w, None)
    assert s.shape == (3, 1, 1)           # one scale per layer, not per stack
    assert float(s[2, 0, 0]) == 0.0
    assert float(s[1, 0, 0]) > 5 * float(s[0, 0, 0])
    _, sg = _check_against_ref(w, 3)
    assert sg.shape == (3, 4, 5)


def test_ternarize_1d_and_rounding_half_to_even():
    # mean(|w|) = 1 -> w/scale = w; 0.5 -> 0 (half to even), 1.5 -> 2 -> clipped to 1
    w = np.array([0.5, -0.5, 1.5, -1.5], np.float32)   # mean |w| = 1
    q, s = quant.ternarize(w)
    assert s.shape == (1,) and float(s[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q), [0, 0, 1, -1])
    q, s = quant.ternarize(_rand((8,), seed=4), 4)
    assert q.shape == (8,) and s.shape == (2,)
    _check_against_ref(_rand((8,), seed=4), 4)


def test_dequantize_is_q_times_broadcast_scale():
    w = _rand((2, 8, 3), seed=5)
    for g in (None, 2, 8):
        q, s = quant.ternarize(w, g)
        qn, sn = np.asarray(q).astype(np.float64), np.asarray(s).astype(np.float64)
        reps = 8 // sn.shape[-2]
        expect = qn * np.repeat(np.broadcast_to(sn, (2, sn.shape[-2], 3)), reps, axis=-2)
        out = quant.dequantize(q, s)
        assert out.dtype == jnp.float32 and out.shape == w.shape
        np.testing.assert_array_equal(np.asarray(out, np.float64), expect.astype(np.float32))


def test_ternarize_accepts_bf16_and_numpy():
    w = jnp.asarray(_rand((16, 4), seed=6), dtype=jnp.bfloat16)
    q, s = quant.ternarize(w, 8)
    assert s.dtype == jnp.float32
    rq, rs = ref_ternarize(np.asarray(w.astype(jnp.float32)), 8)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# straight-through estimator
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [None, 4])
def test_ternary_ste_forward_and_identity_gradient(dtype, group_size):
    w = jnp.asarray(_rand((2, 8, 6), seed=7), dtype=dtype)
    c = jnp.asarray(_rand((2, 8, 6), seed=8), dtype=dtype)
    fwd = jax.jit(quant.ternary_ste, static_argnums=1)(w, group_size)
    assert fwd.dtype == dtype
    expect = quant.dequantize(*quant.ternarize(w, group_size)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(fwd, np.float32), np.asarray(expect, np.float32))
    assert not np.array_equal(np.asarray(fwd, np.float32), np.asarray(w, np.float32))
    g = jax.jit(jax.grad(lambda w: (quant.ternary_ste(w, group_size) * c).sum()))(w)
    assert g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(c, np.float32))


def test_ternary_ste_gradient_differs_from_naive_quantizer():
    # the plain quantizer's gradient is zero through round and non-zero through the scale;
    # the STE must not be that
    w = jnp.asarray(_rand((4, 4), seed=9))
    naive = jax.grad(lambda w: (quant.dequantize(*quant.ternarize(w))).sum())(w)
    ste = jax.grad(lambda w: quant.ternary_ste(w).sum())(w)
    np.testing.assert_array_equal(np.asarray(ste), np.ones((4, 4), np.float32))
    assert not np.array_equal(np.asarray(naive), np.asarray(ste))


# ------------------------------------------------------------------------------------------
# packing
SHAPES = [(1,), (4,), (5,), (7,), (13, 5), (3, 17, 11), (0,)]


def _rand_ternary(shape, seed):
    return np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)


@pytest.mark.parametrize("fmt", ["tq1", "tq2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_roundtrip_exact(fmt, shape):
    q = _rand_ternary(shape, seed=sum(shape) + len(shape))
    blob = quant.pack(q, fmt)
    assert isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1
    n = math.prod(shape)
    per = 4 if fmt == "tq2" else 5
    assert blob.size == -(-n // per) == quant.packed_nbytes(n, fmt)
    out = quant.unpack(blob, shape, fmt)
    assert out.dtype == np.int8 and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, q)
    np.testing.assert_array_equal(quant.unpack(blob.tobytes(), shape, fmt), q)   # bytes too


def test_pack_accepts_jax_and_ternarize_output():
    q, _ = quant.ternarize(_rand((9, 7), seed=10))
    for fmt in ("tq1", "tq2"):
        np.testing.assert_array_equal(quant.unpack(quant.pack(q, fmt), q.shape, fmt),
                                      np.asarray(q))


def test_packed_sizes_and_compression():
    assert [quant.packed_nbytes(n, "tq2") for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert [quant.packed_nbytes(n, "tq1") for n in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    for n in (100, 101, 257, 1000, 4099):
        bf16 = 2 * n
        assert bf16 / quant.packed_nbytes(n, "tq2") >= 7
        assert bf16 / quant.packed_nbytes(n, "tq1") >= 9
        q = _rand_ternary((n,), seed=n)
        assert quant.pack(q, "tq2").nbytes == quant.packed_nbytes(n, "tq2")
        assert quant.pack(q, "tq1").nbytes == quant.packed_nbytes(n, "tq1")


def test_hand_checked_bytes():
    # tq2: codes q+1 = [0, 1, 2, 2], LSB pair first: 0 + 1<<2 + 2<<4 + 2<<6 = 164
    assert quant.pack(np.array([-1, 0, 1, 1]), "tq2").tolist() == [164]
    # padding is q = 0 (code 1): [1] -> code 2, then three codes 1 -> 2 + 4 + 16 + 64 = 86
    assert quant.pack(np.array([1]), "tq2").tolist() == [86]
    assert quant.pack(np.array([1, -1, -1, -1, 0]), "tq2").tolist() == [2, 0b01010101]
    # tq1: trits q+1 = [0, 1, 2, 2, 1], least significant first: 0 + 3 + 18 + 54 + 81 = 156
    assert quant.pack(np.array([-1, 0, 1, 1, 0]), "tq1").tolist() == [156]
    assert quant.pack(np.array([1, 1, 1, 1, 1]), "tq1").tolist() == [242]
    assert quant.pack(np.array([-1] * 5 + [1]), "tq1").tolist() == [0, 2 + 3 + 9 + 27 + 81]
    np.testing.assert_array_equal(quant.unpack(bytes([164]), (4,), "tq2"), [-1, 0, 1, 1])
    np.testing.assert_array_equal(quant.unpack(bytes([156]), (5,), "tq1"), [-1, 0, 1, 1, 0])


# ------------------------------------------------------------------------------------------
# bad input
def test_group_size_not_dividing_raises():
    with pytest.raises(quant.QuantError) as e:
        quant.ternarize(np.ones((12, 4), np.float32), 5)
    msg = str(e.value)
    assert "5" in msg and "12" in msg and "1, 2, 3, 4, 6, 12" in msg
    assert isinstance(e.value, UserError)
    with pytest.raises(quant.QuantError, match="24"):
        quant.ternary_ste(jnp.ones((2, 24, 3)), 7)
    with pytest.raises(quant.QuantError):
        quant.ternarize(np.ones((12, 4), np.float32), 0)


@pytest.mark.parametrize("fmt", ["tq1", "tq2"])
def test_truncated_or_long_blob_raises(fmt):
    q = _rand_ternary((13, 5), seed=11)
    blob = quant.pack(q, fmt)
    expected = quant.packed_nbytes(65, fmt)
    with pytest.raises(quant.QuantError) as e:
        quant.unpack(blob[:-1], (13, 5), fmt)
    assert str(expected) in str(e.value) and str(expected - 1) in str(e.value)
    with pytest.raises(quant.QuantError):
        quant.unpack(np.concatenate([blob, blob[:1]]), (13, 5), fmt)
    with pytest.raises(quant.QuantError):
        quant.unpack(blob, (14, 5), fmt) if fmt == "tq1" else quant.unpack(blob, (13, 6), fmt)


def test_corrupt_bytes_raise():
    blob = quant.pack(_rand_ternary((20,), seed=12), "tq1")
    bad = blob.copy()
    bad[2] = 243
    with pytest.raises(quant.QuantError, match="243"):
        quant.unpack(bad, (20,), "tq1")
    bad[2] = 255
    with pytest.raises(quant.QuantError):
        quant.unpack(bad, (20,), "tq1")
    blob = quant.pack(_rand_ternary((20,), seed=13), "tq2")
    bad = blob.copy()
    bad[3] = (bad[3] & 0b11001111) | 0b00110000          # code 3 in slot 2
    with pytest.raises(quant.QuantError, match="code 3"):
        quant.unpack(bad, (20,), "tq2")
    with pytest.raises(quant.QuantError):                  # code 3 in the padding slot too
        quant.unpack(bytes([0b11000000]), (3,), "tq2")


def test_unknown_format_raises():
    for call in (lambda: quant.pack(np.zeros(4, np.int8), "tq3"),
                 lambda: quant.unpack(b"\x00", (4,), "i2s"),
                 lambda: quant.packed_nbytes(4, "TQ2")):
        with pytest.raises(quant.QuantError, match="tq1.*tq2|tq2.*tq1"):
            call()


def test_pack_rejects_non_ternary_values():
    for q in (np.array([0, 2, 1], np.int8), np.array([-2, 0]), np.array([0.5, 1.0]),
              np.array([[1, 0], [0, 127]], np.int8)):
        with pytest.raises(quant.QuantError):
            quant.pack(q, "tq2")
        with pytest.raises(quant.QuantError):
            quant.pack(q, "tq1")
    # float values that are exactly ternary are fine
    assert quant.pack(np.array([-1.0, 0.0, 1.0, 1.0]), "tq2").tolist() == [164]


# ------------------------------------------------------------------------------------------
# row-planar matrix layout (packed checkpoints, ternary matmuls)
@pytest.mark.parametrize("fmt,per", [("tq2", 4), ("tq1", 5)])
@pytest.mark.parametrize("k", [1, 9, 20, 23])
def test_pack_rows_matches_loop_definition_and_round_trips(fmt, per, k):
    rng = np.random.default_rng(k)
    q = rng.integers(-1, 2, size=(2, k, 3)).astype(np.int8)
    packed = quant.pack_rows(q, fmt)
    r = -(-k // per)
    assert packed.shape == (2, r, 3) and packed.dtype == np.uint8
    for lead in range(2):
        for row in range(r):
            for col in range(3):
                codes = [int(q[lead, j * r + row, col]) + 1 if j * r + row < k else 1
                         for j in range(per)]
                want = (sum(c << (2 * j) for j, c in enumerate(codes)) if fmt == "tq2"
                        else sum(c * 3 ** j for j, c in enumerate(codes)))
                assert packed[lead, row, col] == want
    out = jax.jit(lambda p: quant.unpack_rows(p, k, fmt, jnp.bfloat16))(packed)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), q)


def test_check_rows_rejects_bytes_no_ternary_packs_to():
    quant.check_rows(quant.pack_rows(np.ones((8, 2), np.int8), "tq2"), "tq2")
    with pytest.raises(quant.QuantError, match=r"corrupt tq2 .*byte \(0, 1\)"):
        quant.check_rows(np.array([[0, 0b11000000]], np.uint8), "tq2")
    with pytest.raises(quant.QuantError, match="corrupt tq1"):
        quant.check_rows(np.array([[243]], np.uint8), "tq1")
