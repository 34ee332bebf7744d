"""Each MiniCPM4 building block against an independent numpy statement of its formula.

Spec: /work/shared/spec/minicpm4.md section 2. References are written here in float64 numpy
(never by calling mcpm), inputs are fresh random draws, and gradients are checked against
analytic numpy gradients or numpy central differences.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpm.config import ModelConfig, RopeScaling
from mcpm.model import MiniCPM4
from mcpm.model import attention as _attention
from mcpm.model import layers as _layers
from mcpm.model.layers import rope_factors
from mcpm.model.minicpm4 import init_std

RTOL, ATOL = 1e-5, 1e-6

# jit the functions under test: one XLA compile per test instead of one per eager op keeps the
# file fast on a small CPU machine (the computation is the same).
rms_norm = jax.jit(_layers.rms_norm, static_argnums=2)
rope_cos_sin = jax.jit(_layers.rope_cos_sin, static_argnums=1)
apply_rope = jax.jit(_layers.apply_rope)
swiglu = jax.jit(_layers.swiglu)
attention_mask = jax.jit(_attention.attention_mask)
dense_attention = jax.jit(_attention.dense_attention)
forward = nnx.jit(lambda model, ids: model(ids))


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=(2,))
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------------------------------
# numpy references
# ------------------------------------------------------------------------------------------

def np_rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def np_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def np_rope_tables(pos, d, theta, ext=None, s=1.0):
    """cos, sin [..., d] in float64: freq[t, j] = t / ext[j] * theta^(-2j/d)."""
    j = np.arange(d // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * j / d)
    ext = np.ones(d // 2) if ext is None else np.asarray(ext, np.float64)
    freq = np.asarray(pos, np.float64)[..., None] / ext * inv_freq
    ang = np.concatenate([freq, freq], axis=-1)
    return np.cos(ang) * s, np.sin(ang) * s, ang


def np_apply_rope(x_btnd, cos_btd, sin_btd):
    c, s = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
    return x_btnd * c + np_rotate_half(x_btnd) * s


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_swiglu(x, gate, up, down):
    return (np_silu(x @ gate) * (x @ up)) @ down


def np_attention_loop(q, k, v, mask):
    """Dense GQA by explicit loops: query head i uses kv head i // G; masked rows give 0."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    g = n // kv
    out = np.zeros((b, t, n, d))
    for bi in range(b):
        for i in range(n):
            kh = i // g
            for ti in range(t):
                vis = np.nonzero(mask[bi, ti])[0]
                if len(vis) == 0:
                    continue
                sc = np.array([q[bi, ti, i] @ k[bi, s, kh] for s in vis]) / math.sqrt(d)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                out[bi, ti, i] = sum(pj * v[bi, s, kh] for pj, s in zip(p, vis))
    return out


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------

def test_rms_norm_forward_float32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 48)).astype(np.float32) * 3.0
    w = rng.normal(size=(48,)).astype(np.float32)
    for eps in (1e-6, 0.5):
        got = rms_norm(jnp.asarray(x), jnp.asarray(w), eps)
        assert got.dtype == jnp.float32 and got.shape == x.shape
        np.testing.assert_allclose(f64(got), np_rms_norm(x, w, eps), rtol=RTOL, atol=ATOL)


def test_rms_norm_backward_analytic():
    rng = np.random.default_rng(1)
    eps = 0.1  # large eps so that the eps term shows up in the gradient
    x = rng.normal(size=(3, 4, 16)).astype(np.float32)
    w = rng.normal(size=(16,)).astype(np.float32)
    c = rng.normal(size=(3, 4, 16)).astype(np.float32)

    gx, gw = jax.grad(lambda x_, w_: jnp.sum(rms_norm(x_, w_, eps) * c), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w))

    X, W, C = f64(x), f64(w), f64(c)
    h = X.shape[-1]
    r = 1.0 / np.sqrt(np.mean(X * X, -1, keepdims=True) + eps)
    want_gw = np.sum(C * X * r, axis=(0, 1))
    want_gx = r * W * C - X * r ** 3 / h * np.sum(C * W * X, -1, keepdims=True)
    np.testing.assert_allclose(f64(gx), want_gx, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(f64(gw), want_gw, rtol=RTOL, atol=1e-5)


def test_rms_norm_bfloat16_normalises_in_float32():
    """bf16 in, bf16 out, but the normalisation itself is done in float32 and rounded once.

    With unit weight the output must be round_bf16(exact result) for (almost) every element; a
    version that squares, averages or rsqrt's in bfloat16 rounds several times and misses this.
    """
    rng = np.random.default_rng(2)
    h = 512
    x_bf = jnp.asarray(rng.normal(size=(8, h)) * 5.0 + 1.0, jnp.bfloat16)
    ones = jnp.ones((h,), jnp.bfloat16)
    got = rms_norm(x_bf, ones, 1e-6)
    assert got.dtype == jnp.bfloat16

    exact = np_rms_norm(np.asarray(x_bf.astype(jnp.float32)), np.ones(h), 1e-6)
    want = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    got32 = np.asarray(got.astype(jnp.float32))
    match = np.mean(got32 == want)
    assert match > 0.99, f"only {match:.3f} of bf16 outputs equal round_bf16(float32 rmsnorm)"
    np.testing.assert_allclose(got32, exact, rtol=2 ** -8, atol=0)

    # the weight multiplies after the cast back: round_bf16(round_bf16(y) * w)
    w_bf = jnp.asarray(rng.normal(size=(h,)), jnp.bfloat16)
    got_w = np.asarray(rms_norm(x_bf, w_bf, 1e-6).astype(jnp.float32))
    want_w = np.asarray(jnp.asarray(want * np.asarray(w_bf.astype(jnp.float32)), jnp.float32)
                        .astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(got_w == want_w) > 0.99


# ------------------------------------------------------------------------------------------
# RoPE / LongRoPE
# ------------------------------------------------------------------------------------------

LONG = (1.5, 3.0, 7.25, 11.0)
SHORT = (1.1, 2.5, 5.0, 9.5)


def longrope_cfg(max_pos, orig=64, long=LONG, short=SHORT, **kw):
    return tiny_cfg(max_position_embeddings=max_pos,
                    rope_scaling=RopeScaling(long_factor=long, short_factor=short,
                                             original_max_position_embeddings=orig), **kw)


def _check_tables(cfg, pos, ext, s):
    d = cfg.head_dim
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), cfg)
    assert cos.dtype == jnp.float32 and cos.shape == (*pos.shape, d)
    wc, ws, ang = np_rope_tables(pos, d, cfg.rope_theta, ext, s)
    # float32 angles carry a relative error of a few ulps: scale atol with the angle.
    atol = 1e-6 + 4e-7 * np.abs(ang).max() * s
    np.testing.assert_allclose(f64(cos), wc, rtol=0, atol=atol)
    np.testing.assert_allclose(f64(sin), ws, rtol=0, atol=atol)


def test_plain_rope_tables():
    cfg = tiny_cfg(rope_theta=10000.0)
    assert rope_factors(cfg) == (None, 1.0)
    pos = np.random.default_rng(3).integers(0, 60, size=(2, 7))
    _check_tables(cfg, pos, None, 1.0)
    # a different theta changes the table (theta is really used)
    cfg2 = tiny_cfg(rope_theta=500.0)
    _check_tables(cfg2, pos, None, 1.0)


def test_longrope_long_regime():
    cfg = longrope_cfg(max_pos=1024, orig=64)  # max > original: long factors, s > 1
    factors, s = rope_factors(cfg)
    want_s = math.sqrt(1 + math.log(1024 / 64) / math.log(64))
    assert tuple(factors) == LONG
    assert s == pytest.approx(want_s, rel=1e-12)
    assert s > 1
    pos = np.random.default_rng(4).integers(0, 40, size=(2, 9))  # short sequence: still long
    _check_tables(cfg, pos, LONG, want_s)


def test_longrope_short_regime():
    cfg = longrope_cfg(max_pos=64, orig=64)  # max == original: short factors, s = 1
    factors, s = rope_factors(cfg)
    assert tuple(factors) == SHORT
    assert s == pytest.approx(1.0, abs=1e-12)
    pos = np.random.default_rng(5).integers(0, 64, size=(3, 5))
    _check_tables(cfg, pos, SHORT, 1.0)


def test_apply_rope_forward_and_backward():
    rng = np.random.default_rng(6)
    b, t, n, d = 2, 5, 3, 8
    cfg = longrope_cfg(max_pos=512, orig=64)
    pos = rng.integers(0, 50, size=(b, t))
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), cfg)
    x = rng.normal(size=(b, t, n, d)).astype(np.float32)

    got = apply_rope(jnp.asarray(x), cos, sin)
    assert got.dtype == jnp.float32
    want = np_apply_rope(f64(x), f64(cos), f64(sin))
    np.testing.assert_allclose(f64(got), want, rtol=RTOL, atol=ATOL)

    # rotate-half convention pinned down by hand for one vector: x' = x cos + [-x2, x1] sin
    e = np.zeros((1, 1, 1, d), np.float32)
    e[..., 0] = 1.0  # first half, index 0 -> goes to index d/2 with +sin
    c1 = np.full((1, 1, d), 0.6, np.float32)
    s1 = np.full((1, 1, d), 0.8, np.float32)
    r = np.asarray(apply_rope(jnp.asarray(e), jnp.asarray(c1), jnp.asarray(s1)))[0, 0, 0]
    want_r = np.zeros(d)
    want_r[0], want_r[d // 2] = 0.6, 0.8
    np.testing.assert_allclose(r, want_r, atol=1e-7)

    # backward: RoPE is linear, x -> x*cos + R x*sin, so grad = c*cos + R^T(c*sin) with
    # R^T [g1, g2] = [g2, -g1]
    cot = rng.normal(size=x.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda x_: apply_rope(x_, cos, sin), jnp.asarray(x))
    (gx,) = vjp(jnp.asarray(cot))
    C, Cs, Sn = f64(cot), f64(cos)[:, :, None, :], f64(sin)[:, :, None, :]
    cs = C * Sn
    h = d // 2
    want_g = C * Cs + np.concatenate([cs[..., h:], -cs[..., :h]], axis=-1)
    np.testing.assert_allclose(f64(gx), want_g, rtol=RTOL, atol=ATOL)


def test_apply_rope_bfloat16_input_keeps_dtype():
    rng = np.random.default_rng(7)
    cfg = tiny_cfg()
    pos = np.arange(6)[None]
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg)
    x = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.bfloat16)
    got = apply_rope(x, cos, sin)
    assert got.dtype == jnp.bfloat16
    want = np_apply_rope(f64(x.astype(jnp.float32)), f64(cos), f64(sin))
    np.testing.assert_allclose(f64(got.astype(jnp.float32)), want, rtol=2 ** -7, atol=1e-2)


def test_plain_rope_dot_product_depends_only_on_offset():
    rng = np.random.default_rng(8)
    cfg = tiny_cfg(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # d = 16
    d = cfg.head_dim
    q = rng.normal(size=(d,)).astype(np.float32)
    k = rng.normal(size=(d,)).astype(np.float32)
    base = np.array([0, 3, 11, 25, 40])

    def dots(delta):
        pq = base
        pk = base + delta
        cq, sq = rope_cos_sin(jnp.asarray(pq[None]), cfg)
        ck, sk = rope_cos_sin(jnp.asarray(pk[None]), cfg)
        qr = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(q), (1, len(base), 1, d)), cq, sq))
        kr = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(k), (1, len(base), 1, d)), ck, sk))
        return np.einsum("td,td->t", qr[0, :, 0].astype(np.float64), kr[0, :, 0].astype(np.float64))

    for delta in (0, 1, 5, 17):
        v = dots(delta)
        np.testing.assert_allclose(v, np.full_like(v, v[0]), rtol=0, atol=5e-5)
    # and it really depends on the offset
    assert abs(dots(0)[0] - dots(5)[0]) > 1e-2


# ------------------------------------------------------------------------------------------
# Attention: mask semantics and grouped-query attention
# ------------------------------------------------------------------------------------------

def test_attention_mask_semantics():
    rng = np.random.default_rng(9)
    b, t, s = 3, 6, 9
    q_slot = rng.integers(0, 9, size=(b, t))
    k_slot = np.broadcast_to(np.arange(s), (b, s)).copy()
    k_slot[1] = rng.permutation(s)  # slots need not be sorted
    q_seg = rng.integers(0, 3, size=(b, t))
    k_seg = rng.integers(0, 3, size=(b, s))
    got = np.asarray(attention_mask(*(jnp.asarray(a, jnp.int32)
                                      for a in (q_slot, q_seg, k_slot, k_seg))))
    assert got.dtype == np.bool_ and got.shape == (b, t, s)
    want = np.zeros((b, t, s), bool)
    for bi in range(b):
        for ti in range(t):
            for si in range(s):
                want[bi, ti, si] = (k_slot[bi, si] <= q_slot[bi, ti]
                                    and k_seg[bi, si] == q_seg[bi, ti]
                                    and k_seg[bi, si] != 0)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


@pytest.mark.parametrize("n,kv", [(6, 2), (4, 4), (4, 1)])
def test_dense_attention_gqa_vs_numpy_loop(n, kv):
    rng = np.random.default_rng(10 + n + kv)
    b, t, d = 2, 6, 8
    q = rng.normal(size=(b, t, n, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :, 0] = False  # padding key 0 in row 1: query 0 of row 1 sees nothing
    mask[0, :, 3] = False  # padding key in the middle of row 0
    got = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert got.shape == (b, t, n, d) and got.dtype == jnp.float32
    got = np.asarray(got)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[1, 0], 0.0)  # fully masked row: zeros, not NaN
    want = np_attention_loop(f64(q), f64(k), f64(v), mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_dense_attention_gqa_head_mapping_is_blocked_not_interleaved():
    """Heads 0..G-1 share kv head 0 (i // G), not i % K: make the kv heads distinguishable."""
    b, t, n, kv, d = 1, 1, 4, 2, 2
    q = np.ones((b, t, n, d), np.float32)
    k = np.ones((b, t, kv, d), np.float32)
    v = np.zeros((b, t, kv, d), np.float32)
    v[0, 0, 0] = [1.0, 0.0]
    v[0, 0, 1] = [0.0, 1.0]
    out = np.asarray(dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.ones((b, t, t), bool)))
    np.testing.assert_allclose(out[0, 0], [[1, 0], [1, 0], [0, 1], [0, 1]], atol=1e-7)


def test_dense_attention_backward_finite_difference():
    rng = np.random.default_rng(11)
    b, t, n, kv, d = 1, 5, 4, 2, 4
    q = rng.normal(size=(b, t, n, d))
    k = rng.normal(size=(b, t, kv, d))
    v = rng.normal(size=(b, t, kv, d))
    mask = np.tril(np.ones((t, t), bool))[None]
    mask[0, :, 1] = False
    cot = rng.normal(size=(b, t, n, d))

    def f_np(qq, kk, vv):
        return float(np.sum(np_attention_loop(qq, kk, vv, mask) * cot))

    grads = jax.grad(lambda a, bb, c: jnp.sum(dense_attention(a, bb, c, jnp.asarray(mask))
                                              * jnp.asarray(cot, jnp.float32)),
                     argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    h = 1e-5
    for trial in range(2):
        dirs = [rng.normal(size=a.shape) for a in (q, k, v)]
        fd = (f_np(q + h * dirs[0], k + h * dirs[1], v + h * dirs[2])
              - f_np(q - h * dirs[0], k - h * dirs[1], v - h * dirs[2])) / (2 * h)
        an = sum(float(np.sum(f64(g) * u)) for g, u in zip(grads, dirs))
        assert an == pytest.approx(fd, rel=1e-4, abs=1e-4)
    # the masked key gets no gradient
    np.testing.assert_array_equal(np.asarray(grads[1])[0, 1], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2])[0, 1], 0.0)


# ------------------------------------------------------------------------------------------
# SwiGLU
# ------------------------------------------------------------------------------------------

def test_swiglu_forward_and_backward():
    rng = np.random.default_rng(12)
    b, t, h, i = 2, 3, 16, 24
    x = rng.normal(size=(b, t, h)).astype(np.float32)
    gate = (rng.normal(size=(h, i)) * 0.5).astype(np.float32)
    up = (rng.normal(size=(h, i)) * 0.5).astype(np.float32)
    down = (rng.normal(size=(i, h)) * 0.5).astype(np.float32)
    args = [jnp.asarray(a) for a in (x, gate, up, down)]
    got = swiglu(*args)
    X, Gt, U, Dn = (f64(a) for a in (x, gate, up, down))
    np.testing.assert_allclose(f64(got), np_swiglu(X, Gt, U, Dn), rtol=RTOL, atol=1e-5)

    cot = rng.normal(size=(b, t, h)).astype(np.float32)
    grads = jax.grad(lambda *a: jnp.sum(swiglu(*a) * cot), argnums=(0, 1, 2, 3))(*args)
    C = f64(cot)
    g, u = X @ Gt, X @ U
    sig = 1 / (1 + np.exp(-g))
    silu = g * sig
    dsilu = sig * (1 + g * (1 - sig))
    a = silu * u
    da = C @ Dn.T
    du = da * silu
    dg = da * u * dsilu
    want = (dg @ Gt.T + du @ U.T,
            np.einsum("bth,bti->hi", X, dg),
            np.einsum("bth,bti->hi", X, du),
            np.einsum("bti,bth->ih", a, C))
    for name, gg, ww in zip(("x", "gate", "up", "down"), grads, want):
        np.testing.assert_allclose(f64(gg), ww, rtol=RTOL, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------
# Embedding scale, residual scale, logit divisor (targeted 1-layer models)
# ------------------------------------------------------------------------------------------

def model_with_params(cfg: ModelConfig, params: dict) -> MiniCPM4:
    """A MiniCPM4 whose parameters are the given numpy arrays (shapes from the abstract model;
    skips the random init, whose compile dominates the runtime of these tiny tests)."""
    model = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    for name, value in params.items():
        var = getattr(model, name)
        assert var.shape == value.shape, name
        var.set_value(jnp.asarray(value, jnp.float32))
    return model


def random_params(cfg: ModelConfig, rng, std=0.2) -> dict:
    L, H, N, K, D, I, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size)
    shapes = {"embed": (V, H), "q": (L, H, N, D), "k": (L, H, K, D), "v": (L, H, K, D),
              "o": (L, N, D, H), "gate": (L, H, I), "up": (L, H, I), "down": (L, I, H)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    p = {n: (rng.normal(size=s) * std).astype(np.float32) for n, s in shapes.items()}
    for n, s in (("attn_norm", (L, H)), ("mlp_norm", (L, H)), ("final_norm", (H,))):
        p[n] = (1 + 0.3 * rng.normal(size=s)).astype(np.float32)
    return p


def test_scale_emb_and_logit_divisor_with_empty_layers():
    # eps comparable to mean(h^2) so that RMSNorm does not hide scale_emb
    cfg = tiny_cfg(num_hidden_layers=1, scale_emb=3.0, dim_model_base=8, rms_norm_eps=0.05)
    rng = np.random.default_rng(13)
    p = random_params(cfg, rng, std=0.1)
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        p[name] = np.zeros_like(p[name])
    model = model_with_params(cfg, p)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 5))
    got = f64(forward(model, jnp.asarray(ids, jnp.int32)))

    E, fn = f64(p["embed"]), f64(p["final_norm"])
    h = E[ids] * 3.0
    m = 32 / 8
    want = (np_rms_norm(h, fn, 0.05) / m) @ E.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # sanity: these constants are visible in the output at this eps
    assert np.abs((np_rms_norm(E[ids], fn, 0.05) / m) @ E.T - want).max() > 1e-3
    assert np.abs(np_rms_norm(h, fn, 0.05) @ E.T - want).max() > 1e-3


def test_residual_scale_on_branches():
    """1 layer, attention branch off (o = 0), MLP on: h = e + r * MLP(RMSNorm(e))."""
    L = 1
    cfg = tiny_cfg(num_hidden_layers=L, scale_depth=2.5, scale_emb=2.0, dim_model_base=16,
                   tie_word_embeddings=False)
    rng = np.random.default_rng(14)
    p = random_params(cfg, rng)
    p["o"] = np.zeros_like(p["o"])
    model = model_with_params(cfg, p)
    ids = rng.integers(0, cfg.vocab_size, size=(1, 4))
    got = f64(forward(model, jnp.asarray(ids, jnp.int32)))

    E, Wg, Wu, Wd, LM, mw, fw = (f64(p[n]) for n in ("embed", "gate", "up", "down", "lm_head",
                                                      "mlp_norm", "final_norm"))
    r = 2.5 / math.sqrt(L)
    h = E[ids] * 2.0
    h = h + r * np_swiglu(np_rms_norm(h, mw[0], 1e-6), Wg[0], Wu[0], Wd[0])
    want = (np_rms_norm(h, fw, 1e-6) / (32 / 16)) @ LM
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # r matters here: r = 1 gives different logits
    h1 = E[ids] * 2.0
    h1 = h1 + np_swiglu(np_rms_norm(h1, mw[0], 1e-6), Wg[0], Wu[0], Wd[0])
    assert np.abs((np_rms_norm(h1, fw, 1e-6) / 2) @ LM - want).max() > 1e-3


# ------------------------------------------------------------------------------------------
# muP initialisation
# ------------------------------------------------------------------------------------------

MUP_CFG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, dim_model_base=64,
               initializer_range=0.1, max_position_embeddings=256, eos_token_id=(2,))


def test_init_std_formula():
    cfg = ModelConfig(**MUP_CFG)  # m = 256 / 64 = 4
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert init_std(name, cfg) == pytest.approx(0.1 / 2)
    assert init_std("embed", cfg) == pytest.approx(0.1)
    cfg_s = dataclasses.replace(cfg, mup_scale_embedding=True)
    assert init_std("embed", cfg_s) == pytest.approx(0.1 / 2)
    assert init_std("q", cfg_s) == pytest.approx(0.1 / 2)


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_mup_init_empirical_std(scale_embedding):
    cfg = ModelConfig(**MUP_CFG, mup_scale_embedding=scale_embedding)
    model = MiniCPM4(cfg, rngs=nnx.Rngs(3))
    hidden_std = 0.1 / math.sqrt(4)
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        w = f64(getattr(model, name)[...])
        assert abs(w.mean()) < 0.02 * hidden_std, name
        assert w.std() == pytest.approx(hidden_std, rel=0.02), name
    e = f64(model.embed[...])
    want_e = 0.1 / (math.sqrt(4) if scale_embedding else 1.0)
    assert e.std() == pytest.approx(want_e, rel=0.02)
    for name in ("attn_norm", "mlp_norm", "final_norm"):
        np.testing.assert_array_equal(f64(getattr(model, name)[...]), 1.0)
    # layers are initialised independently (not one matrix repeated L times)
    q = f64(model.q[...])
    assert not np.allclose(q[0], q[1])
