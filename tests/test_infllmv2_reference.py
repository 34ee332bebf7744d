"""The InfLLM v2 reference (kernels/infllmv2/reference.py) against a numpy loop over queries
written from spec section 3, and against dense attention where the two must agree."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.config import SparseConfig
from mcpm.model.attention import attention_mask, dense_attention
from mcpm_kernels.infllmv2 import attention_reference, block_mask

SMALL = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16,
                     topk=3, use_nope=False, dense_len=-1)


def numpy_infllmv2(q, k, v, cfg, k_score=None):
    """Per query i and kv group g, literally as the spec words it. Returns (out, selected).
    ``k_score``: the keys stage 1 uses (pre-RoPE ones with use_nope; default k)."""
    k_score = k if k_score is None else k_score
    b_, t, n, d = q.shape
    kv = k.shape[2]
    g_size = n // kv
    ks, st, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    n_kernels = (t - ks) // st + 1 if t >= ks else 0
    m = -(-t // bs)
    w = cfg.window_size // bs
    out = np.zeros_like(q, dtype=np.float64)
    selected = np.zeros((b_, kv, t, m), bool)
    for b in range(b_):
        for g in range(kv):
            kc = np.array([k_score[b, j * st: j * st + ks, g].astype(np.float64).mean(0)
                           for j in range(n_kernels)]).reshape(n_kernels, d)
            # LSE approximation: coarse kernels of 4 x kernel_size keys every 4 x stride
            n_coarse = (t - 4 * ks) // (4 * st) + 1 if t >= 4 * ks else 0
            kcc = [k_score[b, j * 4 * st: j * 4 * st + 4 * ks, g].astype(np.float64).mean(0)
                   for j in range(n_coarse)]
            for i in range(t):
                vis = [j for j in range(n_kernels) if j * st + ks - 1 <= i]
                s = np.zeros(n_kernels)
                for h in range(g * g_size, (g + 1) * g_size):
                    if vis:
                        z = np.array([q[b, i, h] @ kc[j] for j in vis]) / np.sqrt(d)
                        lse = z.max() + np.log(np.exp(z - z.max()).sum())
                        coarse_vis = [j for j in range(n_coarse) if j * 4 * st + 4 * ks - 1 <= i]
                        if cfg.lse_approx and coarse_vis:
                            zc = np.array([q[b, i, h] @ kcc[j] for j in coarse_vis]) / np.sqrt(d)
                            lse = zc.max() + np.log(np.exp(zc - zc.max()).sum())
                        s[vis] += np.exp(z - lse)
                score = np.full(m, -np.inf)
                for blk in range(m):
                    js = [j for j in range(blk * (bs // st) - 1, blk * (bs // st) + bs // st)
                          if 0 <= j < n_kernels]
                    if js:
                        score[blk] = max(s[j] for j in js)
                qb = i // bs
                if cfg.variant == "A":
                    window = [blk for blk in range(m) if qb - w < blk <= qb]
                    for blk in range(m):
                        if blk < cfg.init_blocks:
                            score[blk] = np.inf
                        if blk in window:
                            score[blk] = -np.inf
                    top = np.argsort(-score, kind="stable")[: min(cfg.topk, m)]
                    chosen = {int(blk) for blk in top if blk < qb} | set(window)
                else:  # B: init and blocks qb-W .. qb forced into the budget, future dropped
                    for blk in range(m):
                        if blk < cfg.init_blocks or qb - w <= blk <= qb:
                            score[blk] = np.inf
                    top = np.argsort(-score, kind="stable")[: min(cfg.topk, m)]
                    chosen = {int(blk) for blk in top if blk <= qb}
                selected[b, g, i, sorted(chosen)] = True
                keys = [t_ for t_ in range(i + 1) if t_ // bs in chosen]
                for h in range(g * g_size, (g + 1) * g_size):
                    z = np.array([q[b, i, h] @ k[b, t_, g] for t_ in keys]) / np.sqrt(d)
                    p = np.exp(z - z.max())
                    p /= p.sum()
                    out[b, i, h] = p @ v[b, keys, g].astype(np.float64)
    return out, selected


def rand_qkv(seed, b, t, n, kv, d):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, n, d)).astype(np.float32),
            rng.standard_normal((b, t, kv, d)).astype(np.float32),
            rng.standard_normal((b, t, kv, d)).astype(np.float32))


@pytest.mark.parametrize("t,n,kv", [(70, 4, 2), (45, 2, 1), (7, 4, 2), (64, 6, 3)])
def test_reference_matches_numpy_loop(t, n, kv):
    q, k, v = rand_qkv(t, 2, t, n, kv, 8)
    q *= 2.0  # sharper relevance softmax: selection differs from the trivial choice
    out_np, sel_np = numpy_infllmv2(q, k, v, SMALL)
    sel = np.asarray(block_mask(jnp.asarray(q), jnp.asarray(k), SMALL))
    np.testing.assert_array_equal(sel, sel_np)
    out = np.asarray(attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), SMALL))
    np.testing.assert_allclose(out, out_np, rtol=2e-5, atol=2e-5)
    if t >= 64:  # the test is about sparse selection: some visible block must be left out
        visible = np.arange(-(-t // 8))[None, :] <= (np.arange(t) // 8)[:, None]
        assert (~sel_np & visible[None, None]).any()


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(SMALL, variant="B", topk=5),
    dataclasses.replace(SMALL, variant="B", topk=4, window_size=8, init_blocks=2),
    dataclasses.replace(SMALL, lse_approx=True),
    dataclasses.replace(SMALL, variant="B", topk=5, lse_approx=True),
], ids=["B", "B-small-window", "A-lse", "B-lse"])
def test_variant_b_and_lse_approximation_match_numpy_loop(cfg):
    q, k, v = rand_qkv(11, 2, 77, 4, 2, 8)
    q *= 2.0
    out_np, sel_np = numpy_infllmv2(q, k, v, cfg)
    sel = np.asarray(block_mask(jnp.asarray(q), jnp.asarray(k), cfg))
    np.testing.assert_array_equal(sel, sel_np)
    out = np.asarray(attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), cfg))
    np.testing.assert_allclose(out, out_np, rtol=2e-5, atol=2e-5)
    # the option changes the selection somewhere (else this test could not tell them apart)
    base = dataclasses.replace(cfg, variant="A", lse_approx=False, topk=SMALL.topk)
    assert (sel != np.asarray(block_mask(jnp.asarray(q), jnp.asarray(k), base))).any()


def test_use_nope_scores_with_the_keys_given_for_scoring():
    import mcpm
    q, k, v = rand_qkv(12, 1, 70, 4, 2, 8)
    q *= 2.0
    k_pre = np.random.default_rng(5).standard_normal(k.shape).astype(np.float32)
    cfg = dataclasses.replace(SMALL, use_nope=True)
    out_np, sel_np = numpy_infllmv2(q, k, v, cfg, k_score=k_pre)
    jq, jk, jv, jpre = (jnp.asarray(x) for x in (q, k, v, k_pre))
    sel = np.asarray(mcpm.infllmv2_block_mask(jq, jk, cfg, scoring_keys=jpre))
    np.testing.assert_array_equal(sel, sel_np)
    for impl in ("reference", "xla"):
        out = mcpm.infllmv2_attention(jq, jk, jv, cfg, implementation=impl, scoring_keys=jpre)
        np.testing.assert_allclose(np.asarray(out), out_np, rtol=2e-5, atol=2e-5)
    assert (sel != np.asarray(block_mask(jq, jk, SMALL))).any()
    with pytest.raises(ValueError, match="scoring_keys"):
        mcpm.infllmv2_attention(jq, jk, jv, cfg)


def test_selects_everything_when_topk_covers_all_blocks_equals_dense():
    q, k, v = rand_qkv(1, 2, 50, 4, 2, 8)
    cfg = dataclasses.replace(SMALL, topk=100)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), cfg)
    slot = jnp.broadcast_to(jnp.arange(50), (2, 50))
    seg = jnp.ones((2, 50), jnp.int32)
    dense = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                            attention_mask(slot, seg, slot, seg))
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-6)


def test_below_dense_len_is_dense_and_gradients_flow_only_through_attention():
    q, k, v = rand_qkv(2, 1, 40, 4, 2, 8)
    cfg = dataclasses.replace(SMALL, dense_len=64)
    sel = np.asarray(block_mask(jnp.asarray(q), jnp.asarray(k), cfg))
    visible = np.arange(5)[None, :] <= (np.arange(40) // 8)[:, None]
    np.testing.assert_array_equal(sel[0, 0], visible)
    sparse = dataclasses.replace(SMALL)
    f = lambda q, k, v: attention_reference(q, k, v, sparse).sum()
    gq, gk, gv = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    # numerical check of dk through the attention only (selection is held fixed)
    eps, idx = 1e-3, (0, 33, 1, 5)
    kp, km = k.copy(), k.copy()
    kp[idx] += eps
    km[idx] -= eps
    num = (f(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(v))
           - f(jnp.asarray(q), jnp.asarray(km), jnp.asarray(v))) / (2 * eps)
    assert abs(float(num) - float(gk[idx])) < 2e-2 * max(1.0, abs(float(num)))
    assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gv)).all()


def test_public_api_switch():
    import mcpm
    q, k, v = (jnp.asarray(x) for x in rand_qkv(3, 1, 40, 4, 2, 8))
    seg = jnp.asarray(np.repeat([1, 2], 20)[None])
    out = mcpm.infllmv2_attention(q, k, v, SMALL, implementation="reference", segment_ids=seg)
    ref = attention_reference(q, k, v, SMALL, seg)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # packed documents: the second document never sees the first
    alone = attention_reference(q[:, 20:], k[:, 20:], v[:, 20:],
                                dataclasses.replace(SMALL, topk=100))
    wide = attention_reference(q, k, v, dataclasses.replace(SMALL, topk=100), seg)
    np.testing.assert_allclose(np.asarray(wide[:, 20:]), np.asarray(alone), rtol=1e-5, atol=1e-6)
    assert mcpm.infllmv2_block_mask(q, k, SMALL).shape == (1, 2, 40, 5)
    with pytest.raises(ValueError, match="implementation must be one of"):
        mcpm.infllmv2_attention(q, k, v, SMALL, implementation="fast")


def test_the_official_sparse_config_dict_works_like_sparse_config():
    """A config.json's ``sparse_config`` block as a plain dict, with only the official keys."""
    import mcpm
    q, k, v = (jnp.asarray(x) for x in rand_qkv(5, 1, 40, 4, 2, 8))
    official = {key: getattr(SMALL, key) for key in ("kernel_size", "kernel_stride",
                                                      "init_blocks", "block_size",
                                                      "window_size", "topk", "use_nope",
                                                      "dense_len")}
    np.testing.assert_array_equal(
        np.asarray(mcpm.infllmv2_attention(q, k, v, official, implementation="reference")),
        np.asarray(mcpm.infllmv2_attention(q, k, v, SMALL, implementation="reference")))
    np.testing.assert_array_equal(np.asarray(mcpm.infllmv2_block_mask(q, k, official)),
                                  np.asarray(mcpm.infllmv2_block_mask(q, k, SMALL)))
    # checked as a config is: an unknown key is named, with the closest one
    with pytest.raises(mcpm.ConfigError, match="unknown config key 'sparse_config.top_k'; did "
                                               "you mean 'topk'"):
        mcpm.infllmv2_attention(q, k, v, {**official, "top_k": 3})
