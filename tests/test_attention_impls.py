"""Every dense attention implementation against one independent statement (a float64 numpy
softmax attention and its gradients), on the same cases: causal, packed documents, left
padding, GQA with G = 1, 2, 4, 16, lengths that are not multiples of any tile, float32 and
bfloat16. Then the seam's dispatch and refusals, the model with each implementation, InfLLM v2's
pallas switch, and memory that grows linearly with the sequence.

What runs where: ``einsum`` and ``flash`` run here as they are; ``splash`` (a TPU kernel) runs
in the Pallas interpreter and is compiled for TPU v5e through libtpu's topology description;
``cudnn`` cannot even be traced without a CUDA jaxlib (jax asks cuDNN for its version while
tracing), so its wiring (layout, scale, causal flag, GQA, dtypes) runs here with
``jax.nn.dot_product_attention``'s own XLA implementation standing in for cuDNN, and its refusals
are checked.
"""
import contextlib
import dataclasses
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import packed_segments, qkv
from flax import nnx
from test_forward_numpy import make_cfg, make_model, np_forward, np_params, rel_err

from mcpm.config import ConfigError, ModelConfig, SparseConfig
from mcpm.model import MiniCPM4
from mcpm.model.attention import (EINSUM_MAX_KEYS, attention_mask, attention_target,
                                  dense_attention, dense_implementation, sparse_implementation)
from mcpm_kernels.dense_attention import (dense_attention_cudnn, dense_attention_splash,
                                          dense_attention_xla)

EPS = {"float32": float(np.finfo(np.float32).eps), "bfloat16": float(jnp.finfo(jnp.bfloat16).eps)}


# ------------------------------------------------------------------------------------------
# the independent statement
# ------------------------------------------------------------------------------------------

def reference(q, k, v, seg, ct, eps):
    """float64 ``softmax(q k^T / sqrt(D) masked) v`` and its gradients for the cotangent ``ct``,
    each with a first-order bound on what rounding with relative error ``eps`` per operation
    (scores, probabilities, each product and output) can move it.

    Scores: ``eps * sum_d |q_d k_d| / sqrt(D)`` (also covers a rounded, pre-scaled q); a score
    error e moves each probability by at most ``2 e p``. Every later quantity adds its own
    ``eps`` times the sum of the absolute values of its terms. Returns ``(values, bounds)``,
    each a tuple (out, dq, dk, dv).
    """
    f = lambda x: np.asarray(x, np.float64)
    q, k, v, ct = f(q), f(k), f(v), f(ct)
    b, t, n, d = q.shape
    kv = k.shape[2]
    qg, cg = q.reshape(b, t, kv, n // kv, d), ct.reshape(b, t, kv, n // kv, d)
    seg = np.ones((b, t), int) if seg is None else np.asarray(seg)
    slot = np.arange(t)
    mask = ((slot[None, :] <= slot[:, None])[None] & (seg[:, None, :] == seg[:, :, None])
            & (seg[:, None, :] != 0))[:, None, None]                         # [B, 1, 1, T, S]
    ein = lambda spec, *xs: np.einsum(spec, *xs, optimize=True)
    s = np.where(mask, ein("btkgd,bskd->bkgts", qg, k) / math.sqrt(d), -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    out = ein("bkgts,bskd->btkgd", p, v)
    dv = ein("bkgts,btkgd->bskd", p, cg)
    dp = ein("btkgd,bskd->bkgts", cg, v)
    delta = (p * dp).sum(-1, keepdims=True)
    ds = p * (dp - delta)
    dq = ein("bkgts,bskd->btkgd", ds, k) / math.sqrt(d)
    dk = ein("bkgts,btkgd->bskd", ds, qg) / math.sqrt(d)

    a = np.where(mask, ein("btkgd,bskd->bkgts", abs(qg), abs(k)), 0.0) / math.sqrt(d)
    e_p = (2 * eps * a.max(-1, keepdims=True) + eps) * p                  # |delta p|
    e_out = ein("bkgts,bskd->btkgd", e_p + eps * p, abs(v))
    e_dv = ein("bkgts,btkgd->bskd", e_p + eps * p, abs(cg))
    e_dp = eps * ein("btkgd,bskd->bkgts", abs(cg), abs(v))
    e_delta = (e_p * abs(dp) + p * e_dp + eps * p * abs(dp)).sum(-1, keepdims=True)
    e_ds = e_p * abs(dp - delta) + p * (e_dp + e_delta) + eps * abs(ds)
    e_dq = ein("bkgts,bskd->btkgd", e_ds + eps * abs(ds), abs(k)) / math.sqrt(d)
    e_dk = ein("bkgts,btkgd->bskd", e_ds + eps * abs(ds), abs(qg)) / math.sqrt(d)
    values = (out.reshape(b, t, n, d), dq.reshape(b, t, n, d), dk, dv)
    bounds = (e_out.reshape(b, t, n, d), e_dq.reshape(b, t, n, d), e_dk, e_dv)
    # each result is rounded once more to the compute dtype
    return values, tuple(bd + eps * abs(x) for bd, x in zip(bounds, values))


def test_reference_against_finite_differences():
    """The reference's own gradients against central differences (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in qkv(0, 1, 6, 4, 2, 8))
    seg = np.array([[0, 1, 1, 1, 2, 2]])
    ct = np.random.default_rng(1).standard_normal(q.shape)
    (_, *grads), _ = reference(q, k, v, seg, ct, 0.0)
    loss = lambda q, k, v: (reference(q, k, v, seg, ct, 0.0)[0][0] * ct).sum()
    rng = np.random.default_rng(2)
    for i, x in enumerate((q, k, v)):
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in x.shape)
            hi, lo = [list((q, k, v)) for _ in range(2)]
            hi[i], lo[i] = x.copy(), x.copy()
            hi[i][idx] += 1e-6
            lo[i][idx] -= 1e-6
            fd = (loss(*hi) - loss(*lo)) / 2e-6
            assert abs(fd - grads[i][idx]) < 1e-6 * max(1.0, abs(fd)), (i, idx)


# ------------------------------------------------------------------------------------------
# the implementations
# ------------------------------------------------------------------------------------------

def einsum_impl(q, k, v, seg):
    b, t = q.shape[:2]
    slot = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32) if seg is None else seg
    return dense_attention(q, k, v, attention_mask(slot, seg, slot, seg))


@contextlib.contextmanager
def xla_standing_in_for_cudnn(monkeypatch):
    """``jax.nn.dot_product_attention(implementation="cudnn")`` answered by its XLA
    implementation (the wiring around cuDNN runs here; cuDNN itself needs a GPU)."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kw):
        assert implementation == "cudnn"
        calls.append(dict(kw, shapes=[a.shape for a in args]))
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    yield calls


IMPLS = {
    "einsum": einsum_impl,
    "flash": lambda q, k, v, seg: dense_attention_xla(q, k, v, seg, q_chunk=16, k_chunk=32),
    "splash": lambda q, k, v, seg: dense_attention_splash(q, k, v, seg, interpret=True,
                                                          max_block=128),
    "cudnn": lambda q, k, v, seg: dense_attention_cudnn(q, k, v),
}

# (T, N, K, rows): G = N / K in {1, 2, 4, 16}; lengths not multiples of 8, 16, 32 or 128
CASES = [(1, 2, 2, "causal"), (5, 4, 2, "packed"), (70, 8, 2, "left"), (70, 4, 1, "causal"),
         (257, 16, 1, "packed"), (257, 2, 1, "left")]


def segments(kind, b, t, seed):
    if kind == "causal":
        return None
    if kind == "packed":
        return packed_segments(b, t, seed, min_padding=1 if t > 8 else 0)
    lead = np.random.default_rng(seed).integers(1, max(2, t // 2), b)      # left padding
    return jnp.asarray((np.arange(t)[None, :] >= lead[:, None]).astype(np.int32))


def case_ids(c):
    return f"T{c[0]}-G{c[1] // c[2]}-{c[3]}"


# splash runs in the Pallas interpreter (slow): four cases (lengths 5, 70, 257, every kind of
# row, both dtypes); cuDNN takes neither segment ids nor float32 (refusals tested below)
SPLASH_CASES = [(CASES[1], "float32"), (CASES[2], "bfloat16"), (CASES[3], "float32"),
                (CASES[4], "float32")]
RUNS = ([(impl, c, dt) for impl in ("einsum", "flash") for c in CASES
         for dt in ("float32", "bfloat16")]
        + [("splash", c, dt) for c, dt in SPLASH_CASES]
        + [("cudnn", c, "bfloat16") for c in CASES if c[3] == "causal"])


@pytest.mark.parametrize("impl,case,dtype", RUNS,
                         ids=[f"{i}-{case_ids(c)}-{dt}" for i, c, dt in RUNS])
def test_forward_and_gradients_match_float64(impl, case, dtype, monkeypatch):
    t, n, kv, kind = case
    d, b = 32, 2
    q, k, v = (x.astype(dtype) for x in qkv(t + n, b, t, n, kv, d))
    seg = segments(kind, b, t, t)
    ct = jnp.asarray(np.random.default_rng(t).standard_normal(q.shape), dtype)
    fn = IMPLS[impl]
    with (xla_standing_in_for_cudnn(monkeypatch) if impl == "cudnn"
          else contextlib.nullcontext()):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        got = (out, *vjp(ct))
    assert all(x.dtype == jnp.dtype(dtype) for x in got)
    want, bound = reference(q, k, v, seg, ct, EPS[dtype])
    for name, g, w, bd in zip(("out", "dq", "dk", "dv"), got, want, bound):
        err = np.abs(np.asarray(g, np.float64) - w)
        # factor 2: the bound is first order
        assert (err <= 2 * bd + 1e-30).all(), (name, float(err.max()),
                                               float(bd[err > 2 * bd].min()))
    if seg is not None:           # padding queries give zeros
        pad = np.asarray(seg) == 0
        assert not np.asarray(got[0], np.float32)[pad].any()


def test_cudnn_wiring_passes_causal_and_gqa_without_repeating_heads(monkeypatch):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(3, 1, 20, 8, 2, 32))
    with xla_standing_in_for_cudnn(monkeypatch) as calls:
        jax.jit(dense_attention_cudnn).trace(q, k, v)
    (call,) = calls
    assert call["is_causal"] and call.get("scale") is None          # default 1/sqrt(D)
    assert call["shapes"] == [(1, 20, 8, 32), (1, 20, 2, 32), (1, 20, 2, 32)]


def test_cudnn_cannot_be_traced_without_a_cuda_jaxlib():
    """What this machine can check of cuDNN: jax asks cuDNN for its version while tracing."""
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the implementation test above runs cuDNN itself")
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(3, 1, 16, 4, 2, 32))
    with pytest.raises(RuntimeError, match="cuDNN"):
        jax.jit(dense_attention_cudnn).trace(q, k, v).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype,d,why", [("float32", 32, "bfloat16 or float16"),
                                         ("bfloat16", 36, "multiple of 8")])
def test_cudnn_kernel_refuses_what_cudnn_does_not_take(dtype, d, why):
    q, k, v = (x.astype(dtype) for x in qkv(3, 1, 16, 4, 2, d))
    with pytest.raises(ValueError, match=why):
        dense_attention_cudnn(q, k, v)


# ------------------------------------------------------------------------------------------
# the KV-cache prefill kernel (queries at an offset over a cache)
# ------------------------------------------------------------------------------------------

def test_cached_prefill_kernel_matches_float64():
    """T queries in slots start.. over S cache slots: left padding, an earlier document, empty
    slots after the new keys, S not a multiple of the key tile."""
    from mcpm_kernels.dense_attention import cached_dense_attention_xla
    b, s_len, start, t, n, kv, d = 2, 100, 30, 45, 8, 2, 32
    q, _, _ = qkv(5, b, t, n, kv, d)
    _, k, v = qkv(6, b, s_len, n, kv, d)
    k_seg = np.zeros((b, s_len), np.int32)
    k_seg[0, 3:start + t] = 1                               # row 0: 3 slots of left padding
    k_seg[1, :start + t] = 2
    k_seg[1, :10] = 1                                       # row 1: another document first
    q_seg = k_seg[:, start:start + t]
    kb = lambda x: jnp.asarray(x).transpose(0, 2, 1, 3)    # head-major [B, K, S, D]
    got = cached_dense_attention_xla(q, kb(k), kb(v), jnp.asarray(q_seg), jnp.asarray(k_seg),
                                     jnp.int32(start), q_chunk=16, k_chunk=32)
    f = lambda x: np.asarray(x, np.float64)
    qs, ks = start + np.arange(t), np.arange(s_len)
    mask = ((ks[None, :] <= qs[:, None])[None] & (k_seg[:, None, :] == q_seg[:, :, None])
            & (k_seg[:, None, :] != 0))                    # [B, T, S]
    qg = f(q).reshape(b, t, kv, n // kv, d)
    sc = np.where(mask[:, None, None], np.einsum("btkgd,bskd->bkgts", qg, f(k)) / math.sqrt(d),
                  -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bkgts,bskd->btkgd", p, f(v)).reshape(b, t, n, d)
    a = np.where(mask[:, None, None], np.einsum("btkgd,bskd->bkgts", abs(qg), abs(f(k))),
                 0.0) / math.sqrt(d)
    # scores' rounding (eps * sum|q k| / sqrt(D)) moves a probability by 2x that, plus the
    # output's own rounding; factor 2: first order
    bound = (2 * EPS["float32"] * a.max((1, 2, 4)).max() + 2 * EPS["float32"]) * abs(f(v)).max()
    assert np.abs(f(got) - want).max() <= 2 * bound



# ------------------------------------------------------------------------------------------
# the seam: what auto picks, what is refused
# ------------------------------------------------------------------------------------------

def cfg_with(**kw):
    base = dict(vocab_size=97, hidden_size=256, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, dim_model_base=8,
                eos_token_id=(2,))
    return ModelConfig(**{**base, **kw})


def pick(platform, cfg, key_len=1024, packed=False, dtype=jnp.bfloat16):
    with attention_target(platform):
        return dense_implementation(cfg, key_len=key_len, packed=packed, dtype=dtype)


def test_auto_picks_per_backend_and_call():
    cfg = cfg_with()                                                     # head_dim 64
    assert pick("cpu", cfg, key_len=EINSUM_MAX_KEYS) == "einsum"
    assert pick("cpu", cfg, key_len=EINSUM_MAX_KEYS + 1) == "flash"
    assert pick("cpu", cfg, key_len=EINSUM_MAX_KEYS + 1, packed=True) == "flash"
    assert pick("gpu", cfg, key_len=8) == "cudnn"
    assert pick("cuda", cfg) == "cudnn"
    assert pick("gpu", cfg, packed=True) == "flash"           # segment ids: never dropped
    assert pick("gpu", cfg, dtype=jnp.float32) == "flash"     # cuDNN takes no float32
    assert pick("gpu", cfg_with(hidden_size=4 * 36)) == "flash"         # head dim 36
    assert pick("tpu", cfg) == pick("tpu", cfg, packed=True, key_len=1) == "splash"
    for platform, want in (("cpu", "xla"), ("gpu", "xla"), ("tpu", "pallas")):
        with attention_target(platform):
            assert sparse_implementation(cfg)[0] == want
    for impl in ("einsum", "flash"):                           # run everywhere, as asked
        for platform in ("cpu", "gpu", "tpu"):
            assert pick(platform, cfg_with(attention_impl=impl), packed=True) == impl


@pytest.mark.parametrize("platform,impl,kw,words", [
    ("cpu", "cudnn", {}, ["cudnn needs an NVIDIA GPU", "cpu", "attention_impl=flash"]),
    ("tpu", "cudnn", {}, ["cudnn needs an NVIDIA GPU", "tpu", "attention_impl=flash"]),
    ("gpu", "cudnn", dict(packed=True), ["cannot take segment ids", "attention_impl=flash"]),
    ("gpu", "cudnn", dict(dtype=jnp.float32), ["float32", "compute_dtype=bfloat16", "flash"]),
    ("gpu", "cudnn", dict(hidden_size=4 * 36), ["head dim", "36", "flash"]),
    ("cpu", "splash", {}, ["splash is a TPU", "cpu", "attention_impl=flash"]),
    ("gpu", "splash", {}, ["splash is a TPU", "gpu", "flash", "cudnn"]),
])
def test_unsupported_combinations_say_what_to_use(platform, impl, kw, words):
    call = {k: kw.pop(k) for k in ("packed", "dtype") if k in kw}
    with pytest.raises(ConfigError) as e:
        pick(platform, cfg_with(attention_impl=impl, **kw), **call)
    for w in words:
        assert w in str(e.value)


def test_pallas_infllm_on_gpu_is_refused_in_the_model_and_the_kernel(monkeypatch):
    with attention_target("gpu"), pytest.raises(ConfigError, match="sparse_attention_impl=xla"):
        sparse_implementation(cfg_with(sparse_attention_impl="pallas"))
    from mcpm_kernels.infllmv2.pallas_attention import attention_pallas
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = qkv(0, 1, 64, 4, 2, 16)
    with pytest.raises(ValueError, match="implementation='xla'"):
        attention_pallas(q, k, v, SparseConfig(kernel_size=4, kernel_stride=2, block_size=8,
                                               window_size=16, topk=2, dense_len=-1))


def test_unknown_names_are_config_errors_with_a_suggestion():
    from mcpm.config import Config, from_dict, load_config, model_config_to_hf
    with pytest.raises(ConfigError, match="did you mean 'flash'"):
        cfg_with(attention_impl="flsh")
    with pytest.raises(ConfigError, match="did you mean 'pallas'"):
        cfg_with(sparse_attention_impl="palas")
    with pytest.raises(ConfigError, match="model.attention_impl.*did you mean 'cudnn'"):
        load_config(None, ["model.attention_impl=cuddn"])
    cfg = load_config(None, ["model.attention_impl=splash", "model.sparse_attention_impl=xla"])
    assert isinstance(cfg, Config) and cfg.model.attention_impl == "splash"
    hf = model_config_to_hf(cfg.model)                          # how to run it: not a model field
    assert not any("attention_impl" in key for key in hf)
    assert from_dict(ModelConfig, dataclasses.asdict(cfg_with())).attention_impl == "auto"


def test_the_platform_of_a_train_step_mesh_decides_auto():
    """A program traced for a TPU slice from this host (AOT) gets the TPU implementations: the
    seam reads the platform from the activation sharding hints' mesh."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: no TPU topology to trace for")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mcpm.model.sharding_hints import activation_sharding
    from mcpm.model.attention import target_platform
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices
    mesh = Mesh(np.array(devices[:1]), ("data",))
    if jax.default_backend() == "cpu":
        assert target_platform() == ("cpu", True)
    with activation_sharding(lambda axes, shape: NamedSharding(mesh, PartitionSpec())):
        assert target_platform() == ("tpu", False)                # compiled, not interpreted
        assert dense_implementation(cfg_with(), key_len=8, packed=True,
                                    dtype=jnp.float32) == "splash"
        with attention_target("cpu"):                              # an explicit target wins
            assert target_platform()[0] == "cpu"



# ------------------------------------------------------------------------------------------
# the model with each implementation
# ------------------------------------------------------------------------------------------

MODEL_T = EINSUM_MAX_KEYS + 6          # auto is flash on a CPU at this length


def packed_and_left_padded(t, seed):
    """Row 0: three documents then padding; row 1: left padding then one document. Positions
    restart in each document."""
    seg = np.zeros((2, t), np.int32)
    seg[0] = np.asarray(packed_segments(1, t, seed, min_padding=1))[0]
    seg[1, t // 3:] = 1
    pos = np.zeros((2, t), np.int32)
    for r in range(2):
        for s_id in set(seg[r]) - {0}:
            where = np.flatnonzero(seg[r] == s_id)
            pos[r, where] = np.arange(len(where))
    return seg, pos


def model_fn(impl, platform=None, interpret=False):
    """logits and parameter gradients of sum(logits * ct) of a small GQA model (G = 4)."""
    cfg = make_cfg(kv=1, rope="long", attention_impl=impl)
    model = make_model(cfg, seed=5)
    params = nnx.state(model, nnx.Param)
    graph = nnx.graphdef(model)

    def run(params, ids, pos, seg, ct):
        def f(p):
            out = nnx.merge(graph, p)(ids, positions=pos, segment_ids=seg)
            return (out * ct).sum(), out
        ctx = attention_target(platform, interpret=interpret) if platform else (
            contextlib.nullcontext())
        with ctx:
            (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return np.asarray(out, np.float64), grads
    return cfg, model, params, run


def model_inputs(cfg):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size, (2, MODEL_T))
    seg, pos = packed_and_left_padded(MODEL_T, 4)
    ct = rng.standard_normal((2, MODEL_T, cfg.vocab_size)).astype(np.float32)
    return ids, pos, seg, ct


def grad_rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(rel_err(np.asarray(x, np.float64), np.asarray(y, np.float64))
               for x, y in zip(la, lb))


@pytest.mark.parametrize("impl,platform", [("flash", None), ("auto", None), ("splash", "tpu")])
def test_model_with_each_implementation_matches_numpy_and_einsum(impl, platform):
    """Packed documents and left padding at a length where auto is not einsum: the logits match
    the numpy model (the tolerance of tests/test_forward_numpy.py), the parameter gradients the
    einsum implementation's."""
    cfg, model, params, run = model_fn(impl, platform, interpret=platform is not None)
    ids, pos, seg, ct = model_inputs(cfg)
    out, grads = run(params, ids, pos, seg, ct)
    assert rel_err(out, np_forward(np_params(model), cfg, ids, pos, seg)) < 1e-5
    _, _, params_e, run_e = model_fn("einsum")
    _, grads_e = run_e(params_e, ids, pos, seg, ct)
    # the backward is about twice as deep as the forward: twice the forward's tolerance
    assert grad_rel_err(grads, grads_e) < 2e-5


def test_official_logits_with_flash(official_case):
    """The official PyTorch model's logits (tests/test_official_fixtures.py, same tolerance)
    with the flash implementation, chosen through from_pretrained."""
    import mcpm
    model = mcpm.from_pretrained(official_case / "hf", attention_impl="flash")
    assert model.config.attention_impl == "flash"
    ids = np.load(official_case / "ids.npy").astype(np.int32)
    ref = np.load(official_case / "logits.npy")
    assert rel_err(np.asarray(model(ids), np.float64), ref) < 2e-6


def test_model_with_cudnn_wiring_matches_numpy(monkeypatch):
    """bfloat16 compute, one sequence per row (no segment ids): the cuDNN call's wiring in the
    model, with cuDNN's stand-in; the bfloat16 tolerance of tests/test_forward_numpy.py."""
    cfg = make_cfg(kv=1, rope="long", attention_impl="cudnn", compute_dtype="bfloat16")
    model = make_model(cfg, seed=6)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, MODEL_T))
    with xla_standing_in_for_cudnn(monkeypatch) as calls, attention_target("gpu"):
        out = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))
        assert calls
        with pytest.raises(ConfigError, match="segment ids"):
            model(jnp.asarray(ids, jnp.int32), segment_ids=jnp.ones(ids.shape, jnp.int32))
    assert rel_err(out, np_forward(np_params(model), cfg, ids)) < 2e-2


def test_model_refuses_an_implementation_its_platform_cannot_run():
    model = make_model(make_cfg(attention_impl="splash"), seed=0)
    with pytest.raises(ConfigError, match="splash is a TPU"):
        model(jnp.zeros((1, 8), jnp.int32))


def test_kv_cache_prefill_then_decode_with_each_implementation():
    """A left-padded prompt longer than the einsum prefill limit into a KV cache (auto: the flash
    forward over the cache; einsum: the whole scores), then decode steps (einsum): every
    position's logits equal the numpy model of the unpadded sequence."""
    from mcpm.model import KVCache
    from mcpm.model.attention import PREFILL_EINSUM_MAX_QUERIES
    t, lead, steps = PREFILL_EINSUM_MAX_QUERIES + 10, 7, 3
    ids = np.random.default_rng(8).integers(0, 97, (1, t + steps))
    for impl in ("auto", "einsum"):
        cfg = make_cfg(kv=1, rope="long", attention_impl=impl)
        model = make_model(cfg, seed=9)
        seg = (np.arange(t) >= lead).astype(np.int32)[None]
        pos = np.maximum(np.arange(t) - lead, 0)[None]
        prompt = np.where(seg == 1, ids[:, :t], 0)
        call = nnx.jit(lambda m, x, p, s, c: m(x, positions=p, segment_ids=s, cache=c))
        logits, cache = call(model, jnp.asarray(prompt, jnp.int32), jnp.asarray(pos, jnp.int32),
                             jnp.asarray(seg, jnp.int32), KVCache.create(cfg, 1, 128))
        got = [np.asarray(logits)[0, lead:]]
        for i in range(steps):
            one = jnp.asarray(ids[:, t + i:t + i + 1], jnp.int32)
            logits, cache = call(model, one, jnp.asarray([[t - lead + i]], jnp.int32),
                                 jnp.ones((1, 1), jnp.int32), cache)
            got.append(np.asarray(logits)[0])
        real = np.concatenate([ids[:, lead:t], ids[:, t:]], axis=1)
        want = np_forward(np_params(model), cfg, real)[0]
        assert rel_err(np.concatenate(got), want) < 1e-5, impl


def test_infllm_pallas_switch_reaches_the_kernels_and_matches_xla():
    """sparse_attention_impl=pallas runs the Pallas kernels (interpreted here) in the model; the
    logits and parameter gradients equal the xla path's."""
    sparse = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8,
                          window_size=16, topk=2, use_nope=False, dense_len=-1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 90)), jnp.int32)
    results = {}
    for impl in ("xla", "pallas"):
        cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, dim_model_base=8, eos_token_id=(2,),
                          initializer_range=0.5, sparse_config=sparse,
                          sparse_attention_impl=impl)
        model = MiniCPM4(cfg, rngs=nnx.Rngs(0))
        params, graph = nnx.state(model, nnx.Param), nnx.graphdef(model)
        loss = lambda p: nnx.merge(graph, p)(ids)[:, :, :8].sum()
        assert ("pallas_call" in str(jax.make_jaxpr(loss)(params))) == (impl == "pallas")
        results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    assert rel_err(results["pallas"][0], results["xla"][0]) < 1e-5
    assert grad_rel_err(results["pallas"][1], results["xla"][1]) < 2e-5


# ------------------------------------------------------------------------------------------
# TPU: splash compiled for a v5e without a TPU (libtpu's topology description)
# ------------------------------------------------------------------------------------------

def tpu_mesh():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[test]'): no TPU topology")
    from jax.experimental import topologies
    from jax.sharding import Mesh
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices
    return Mesh(np.array(devices[:1]), ("data",))


def test_splash_compiles_for_tpu_at_the_05b_head_layout():
    """Forward and backward at the 0.5B's heads (N = 16, K = 2, D = 64), bfloat16, packed: three
    Mosaic kernels (forward, dQ, dK/dV), temporaries a few q's, not T x T."""
    from jax.sharding import NamedSharding, PartitionSpec
    rep = NamedSharding(tpu_mesh(), PartitionSpec())
    b, t = 2, 1024
    shapes = [jax.ShapeDtypeStruct((b, t, 16, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, t, 2, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, t, 2, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, t), jnp.int32)]
    loss = lambda q, k, v, seg: dense_attention_splash(q, k, v, seg).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, (0, 1, 2)), in_shardings=(rep,) * 4).trace(*shapes).lower()
    assert lowered.as_text().count("@tpu_custom_call") == 3
    mem = lowered.compile().memory_analysis()
    q_bytes = b * t * 16 * 64 * 2
    assert mem.temp_size_in_bytes < 4 * q_bytes < b * 16 * t * t * 4, mem


def test_model_traced_for_a_tpu_mesh_uses_splash_and_pallas():
    """The model's gradient traced under a TPU mesh's sharding hints (as the train step is for
    ``mcpm aot``) compiles with splash for dense layers and the InfLLM v2 Pallas kernels."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mcpm.model.sharding_hints import activation_sharding
    mesh = tpu_mesh()
    sparse = SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=128,
                          topk=2, dense_len=-1)
    rep = NamedSharding(mesh, PartitionSpec())
    # splash: forward, dQ, dK/dV. InfLLM v2: scoring, forward, dQ, dK/dV (selection is not
    # differentiated), twice: the call as it is and the one for rows with leading padding
    for sparse_config, kernels in ((None, 3), (sparse, 8)):
        cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=256,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          dim_model_base=64, eos_token_id=(2,), compute_dtype="bfloat16",
                          sparse_config=sparse_config)
        model = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
        graph, params = nnx.split(model, nnx.Param)

        def loss(p, ids, seg):
            with activation_sharding(lambda axes, shape: rep):
                return nnx.merge(graph, p)(ids, segment_ids=seg).sum()

        ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
        lowered = jax.jit(jax.grad(loss)).trace(params, ids, ids).lower()
        assert lowered.as_text().count("@tpu_custom_call") == kernels, sparse_config
        lowered.compile()                      # Mosaic accepts the kernels' tiles


# ------------------------------------------------------------------------------------------
# memory: the 0.5B train step, linear in the sequence length
# ------------------------------------------------------------------------------------------

def train_step_temp_bytes(impl, seq_len, batch=8):
    """Temporaries of the compiled train step (the trainer's own builder) of the 0.5B shape
    with 2 layers (scanned: every layer is the same program) and its full vocabulary."""
    from pathlib import Path

    from mcpm.config import load_config
    from mcpm.train.program import build_train_program
    cfg = load_config(Path(__file__).parents[1] / "configs" / "minicpm4-0.5b.yaml",
                      ["model.num_hidden_layers=2", f"model.attention_impl={impl}",
                       f"data.batch_size={batch}", f"data.seq_len={seq_len}"])
    program = build_train_program(cfg)
    lowered = program.step.trace(program.abstract_state, program.batch_spec(batch, seq_len))
    return lowered.lower().compile().memory_analysis().temp_size_in_bytes


def test_train_step_memory_grows_linearly_with_auto():
    """From 1024 to 2048 tokens (batch 8) the temporaries of auto (flash here) grow 1.96x, all
    of it linear (the float32 [B, T, V] logits and their gradient the most); einsum's grow 2.45x,
    its [B, N, T, T] scores and probabilities quadrupling (measured: auto 7.4 -> 14.5 GiB,
    einsum 9.5 -> 23.2 GiB). 2.2x separates the two."""
    small, large = (train_step_temp_bytes("auto", t) for t in (1024, 2048))
    assert large < 2.2 * small, (small, large)
    small_e, large_e = (train_step_temp_bytes("einsum", t) for t in (1024, 2048))
    assert large_e > 2.2 * small_e, (small_e, large_e)       # the check can fail
    assert large + 8 * 16 * 2048 ** 2 * 4 < large_e     # at least one float32 [B, N, T, T] less


SHARDED_CHECK = """
import dataclasses
import jax, jax.numpy as jnp
from attention_inputs import packed_segments, qkv
from mcpm.config import MeshConfig, ModelConfig
from mcpm.model.attention import attention_target, causal_attention
from mcpm.sharding import activation_rules, make_mesh
cfg = ModelConfig(vocab_size=97, hidden_size=256, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2, dim_model_base=8,
                  eos_token_id=(2,), attention_impl="splash")
q, k, v = qkv(0, 4, 40, 8, 2, 32)
seg = packed_segments(4, 40, 1, min_padding=1)
want = causal_attention(q, k, v, seg, dataclasses.replace(cfg, attention_impl="einsum"))
for tensor in (2, 4):        # kv heads split with the query heads; kv heads whole (2 on 4)
    mesh = make_mesh(MeshConfig(data=4 // tensor, tensor=tensor))
    with attention_target("tpu", interpret=True):
        def f(q, k, v, seg):
            with activation_rules(mesh, MeshConfig().rules):
                return causal_attention(q, k, v, seg, cfg)
        got = jax.jit(f)(q, k, v, seg)
    err = float(jnp.abs(got - want).max())
    assert err < 1e-5, (tensor, err)
print("ok")
"""


def test_kernels_run_per_shard_on_a_mesh():
    """XLA cannot partition Mosaic kernels: on a 4-device mesh splash runs in a shard_map (rows
    and heads split as the mesh says, kv heads whole when they do not divide) and gives the
    einsum implementation's outputs (4 CPU devices in a subprocess, splash interpreted)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
               PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
