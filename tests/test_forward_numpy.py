"""The whole MiniCPM4 forward pass against a float64 numpy re-implementation of the spec.

The numpy model below is written from /work/shared/spec/minicpm4.md section 2 only; it reads
mcpm's parameters (layouts documented in mcpm/model/minicpm4.py) and the config's numbers, and
calls no mcpm function.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpm.config import ModelConfig, RopeScaling
from mcpm.model import MiniCPM4

PARAM_NAMES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm",
               "final_norm")


# ------------------------------------------------------------------------------------------
# numpy reference (float64)
# ------------------------------------------------------------------------------------------

def np_params(model: MiniCPM4) -> dict:
    names = PARAM_NAMES + (() if model.config.tie_word_embeddings else ("lm_head",))
    return {n: np.asarray(getattr(model, n)[...], np.float64) for n in names}


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope_tables(cfg: ModelConfig, positions):
    d = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-2.0 * np.arange(d // 2) / d)
    rs = cfg.rope_scaling
    if rs is None:
        ext, s = np.ones(d // 2), 1.0
    elif cfg.max_position_embeddings > rs.original_max_position_embeddings:
        orig = rs.original_max_position_embeddings
        ext = np.asarray(rs.long_factor, np.float64)
        s = math.sqrt(1 + math.log(cfg.max_position_embeddings / orig) / math.log(orig))
    else:
        ext, s = np.asarray(rs.short_factor, np.float64), 1.0
    freq = np.asarray(positions, np.float64)[..., None] / ext * inv_freq
    ang = np.concatenate([freq, freq], axis=-1)
    return np.cos(ang) * s, np.sin(ang) * s


def np_rope(x_btnd, cos, sin):
    h = x_btnd.shape[-1] // 2
    rot = np.concatenate([-x_btnd[..., h:], x_btnd[..., :h]], axis=-1)
    return x_btnd * cos[:, :, None, :] + rot * sin[:, :, None, :]


def np_forward(p: dict, cfg: ModelConfig, ids, positions=None, segment_ids=None):
    ids = np.asarray(ids)
    b, t = ids.shape
    L, H, N, K = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                  cfg.num_key_value_heads)
    d, g = H // N, N // K
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    cos, sin = np_rope_tables(cfg, positions)
    slot = np.arange(t)
    mask = ((slot[None, :] <= slot[:, None])[None]
            & (seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] != 0))  # [B, T, S]

    h = p["embed"][ids] * cfg.scale_emb
    r = cfg.scale_depth / math.sqrt(L)
    for l in range(L):
        x = np_rmsnorm(h, p["attn_norm"][l], cfg.rms_norm_eps)
        q = np_rope(np.einsum("bth,hnd->btnd", x, p["q"][l]), cos, sin)
        k = np_rope(np.einsum("bth,hkd->btkd", x, p["k"][l]), cos, sin)
        v = np.einsum("bth,hkd->btkd", x, p["v"][l])
        o = np.zeros((b, t, N, d))
        for n in range(N):
            kh = n // g
            sc = np.einsum("btd,bsd->bts", q[:, :, n], k[:, :, kh]) / math.sqrt(d)
            sc = np.where(mask, sc, -np.inf)
            mx = np.max(sc, axis=-1, keepdims=True)
            e = np.where(mask, np.exp(sc - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
            den = e.sum(-1, keepdims=True)
            pr = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
            o[:, :, n] = np.einsum("bts,bsd->btd", pr, v[:, :, kh])
        h = h + r * np.einsum("btnd,ndh->bth", o, p["o"][l])
        x = np_rmsnorm(h, p["mlp_norm"][l], cfg.rms_norm_eps)
        gt = x @ p["gate"][l]
        h = h + r * (((gt / (1 + np.exp(-gt))) * (x @ p["up"][l])) @ p["down"][l])
    x = np_rmsnorm(h, p["final_norm"], cfg.rms_norm_eps) / (H / cfg.dim_model_base)
    return x @ (p["embed"].T if cfg.tie_word_embeddings else p["lm_head"])


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

_fwd = nnx.jit(lambda model, ids, positions, segment_ids:
               model(ids, positions=positions, segment_ids=segment_ids))


def run(model, ids, positions=None, segment_ids=None):
    """The model's own forward (jitted: one compile per config instead of one per op)."""
    as_i32 = lambda a: None if a is None else jnp.asarray(a, jnp.int32)
    out = _fwd(model, as_i32(ids), as_i32(positions), as_i32(segment_ids))
    assert out.dtype == jnp.float32
    return np.asarray(out, np.float64)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


LONG = (1.0, 3.5, 12.0, 40.0)
SHORT = (2.5, 1.25, 4.0, 7.5)


def make_cfg(kv=2, tied=True, rope="none", layers=2, **kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied,
                max_position_embeddings=64, dim_model_base=8, eos_token_id=(2,),
                # large enough weights that attention is far from uniform (so that RoPE, the
                # mask and the head mapping all move the logits)
                initializer_range=0.5)
    if rope == "long":  # max > original: long factors and s > 1 at every length
        base.update(max_position_embeddings=4096,
                    rope_scaling=RopeScaling(long_factor=LONG, short_factor=SHORT,
                                             original_max_position_embeddings=64))
    elif rope == "short":  # max == original: short factors, s = 1
        base.update(max_position_embeddings=64,
                    rope_scaling=RopeScaling(long_factor=LONG, short_factor=SHORT,
                                             original_max_position_embeddings=64))
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig, seed: int) -> MiniCPM4:
    model = MiniCPM4(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(1000 + seed)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    model.attn_norm[...] = jnp.asarray(1 + 0.4 * rng.normal(size=(L, H)), jnp.float32)
    model.mlp_norm[...] = jnp.asarray(1 + 0.4 * rng.normal(size=(L, H)), jnp.float32)
    model.final_norm[...] = jnp.asarray(1 + 0.4 * rng.normal(size=(H,)), jnp.float32)
    return model


# (the tests below reuse these configs and the input shape IDS_SHAPE so that jit compiles are
# shared: compiling dominates the runtime at these sizes)
CASES = {
    "tied_gqa2_plain": dict(kv=2, tied=True, rope="none"),
    "tied_gqa2_longrope_long": dict(kv=2, tied=True, rope="long"),
    "tied_gqa2_longrope_short": dict(kv=2, tied=True, rope="short"),
    "untied_gqa1_longrope_long": dict(kv=4, tied=False, rope="long"),
    "untied_gqa4_longrope_short_constants": dict(kv=1, tied=False, rope="short", scale_emb=5.0,
                                                 scale_depth=0.7, dim_model_base=4,
                                                 rms_norm_eps=1e-3, rope_theta=500.0),
}
IDS_SHAPE = (2, 11)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_numpy(case):
    cfg = make_cfg(**CASES[case])
    model = make_model(cfg, seed=len(case))
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, size=IDS_SHAPE)
    got = run(model, ids)
    assert got.shape == (*IDS_SHAPE, cfg.vocab_size)
    p = np_params(model)
    assert not np.allclose(p["attn_norm"], 1.0)  # norm weights really are non-trivial
    want = np_forward(p, cfg, ids)
    assert rel_err(got, want) < 1e-5


def test_eager_call_matches_numpy():
    """The plain (un-jitted) ``MiniCPM4(cfg, rngs=...)(ids)`` call."""
    cfg = make_cfg(**CASES["tied_gqa2_longrope_long"])
    model = make_model(cfg, seed=3)
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, size=IDS_SHAPE)
    got = model(jnp.asarray(ids, jnp.int32))
    assert got.dtype == jnp.float32
    assert rel_err(np.asarray(got, np.float64), np_forward(np_params(model), cfg, ids)) < 1e-5


def test_numpy_reference_is_sensitive_to_rope_regime():
    """Guard for the test itself: the three rope settings give clearly different logits."""
    ids = np.random.default_rng(9).integers(0, 97, size=IDS_SHAPE)
    cfgs = [make_cfg(**CASES[f"tied_gqa2_{r}"])
            for r in ("plain", "longrope_long", "longrope_short")]
    model = make_model(cfgs[0], seed=5)
    p = np_params(model)
    outs = [np_forward(p, c, ids) for c in cfgs]
    for i in range(3):
        for j in range(i + 1, 3):
            assert rel_err(outs[i], outs[j]) > 1e-2
    # and mcpm agrees with each one (same weights, three configs)
    for c, want in zip(cfgs, outs):
        m = nnx.eval_shape(lambda: MiniCPM4(c, rngs=nnx.Rngs(0)))
        for name, value in p.items():
            getattr(m, name).set_value(jnp.asarray(value, jnp.float32))
        assert rel_err(run(m, ids), want) < 1e-5


def test_packed_documents_equal_documents_alone():
    cfg = make_cfg(**CASES["tied_gqa2_longrope_long"])
    model = make_model(cfg, seed=11)
    rng = np.random.default_rng(12)
    rows = [[4, 6, 2], [6, 4, 2]]  # document lengths per row, 12 tokens each
    t = 12
    ids = rng.integers(0, cfg.vocab_size, size=(2, t))
    seg = np.zeros((2, t), int)
    pos = np.zeros((2, t), int)
    for bi, lens in enumerate(rows):
        start = 0
        for di, n in enumerate(lens):
            seg[bi, start:start + n] = 10 * bi + di + 1
            pos[bi, start:start + n] = np.arange(n)
            start += n
    packed = run(model, ids, positions=pos, segment_ids=seg)
    assert rel_err(packed, np_forward(np_params(model), cfg, ids, pos, seg)) < 1e-5
    for bi, lens in enumerate(rows):
        start = 0
        for n in lens:
            alone = run(model, ids[bi:bi + 1, start:start + n])
            np.testing.assert_allclose(packed[bi, start:start + n], alone[0], rtol=1e-5,
                                       atol=1e-5)
            start += n
    # without segment_ids the second document of a row would see the first: different logits
    unpacked = run(model, ids, positions=pos)
    assert np.abs(unpacked[0, 4:10] - packed[0, 4:10]).max() > 1e-2


def test_padding_tokens_do_not_change_other_logits():
    cfg = make_cfg(**CASES["tied_gqa2_longrope_short"])
    model = make_model(cfg, seed=13)
    rng = np.random.default_rng(14)
    t = 10
    ids = rng.integers(0, cfg.vocab_size, size=(2, t))
    # row 0: right padding; row 1: left padding plus a padding token in the middle (7 real
    # tokens in each row)
    seg = np.array([[1] * 7 + [0] * 3,
                    [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
    real = seg != 0
    pos = np.zeros((2, t), int)
    for bi in range(2):
        pos[bi, real[bi]] = np.arange(real[bi].sum())
    out = run(model, ids, positions=pos, segment_ids=seg)
    assert np.all(np.isfinite(out))  # padding queries see no key: still no NaN

    ids2 = ids.copy()
    ids2[~real] = rng.integers(0, cfg.vocab_size, size=(~real).sum())
    assert np.any(ids2[~real] != ids[~real])
    out2 = run(model, ids2, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out2[real], out[real], rtol=1e-6, atol=1e-6)

    # the real tokens' logits are those of the unpadded sequence, and match numpy
    for bi in range(2):
        alone = run(model, ids[bi:bi + 1, real[bi]])
        np.testing.assert_allclose(out[bi, real[bi]], alone[0], rtol=1e-5, atol=1e-5)
    want = np_forward(np_params(model), cfg, ids, pos, seg)
    assert rel_err(out[real], want[real]) < 1e-5
    # padding queries see no key at all (not even other padding): attention adds nothing there
    assert rel_err(out[~real], want[~real]) < 1e-5


def test_bfloat16_compute_close_to_float32():
    cfg32 = make_cfg(**CASES["tied_gqa2_longrope_long"])
    cfg16 = dataclasses.replace(cfg32, compute_dtype="bfloat16")
    m32, m16 = make_model(cfg32, seed=21), make_model(cfg16, seed=21)
    ids = np.random.default_rng(22).integers(0, cfg32.vocab_size, size=IDS_SHAPE)
    ref = np_forward(np_params(m32), cfg32, ids)
    assert rel_err(np_params(m16)["q"], np_params(m32)["q"]) == 0  # same weights
    out32 = run(m32, ids)
    out16 = run(m16, ids)
    assert np.all(np.isfinite(out16))
    assert rel_err(out32, ref) < 1e-5
    err16 = rel_err(out16, out32)
    assert err16 < 2e-2
    assert err16 > 1e-5  # it really computed in bfloat16
