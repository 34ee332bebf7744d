"""Ternary QAT (mcpm.quant.qat, the train step under ``quant:``, ``train.init_from``).

The reference here is a float64 numpy statement of the absmean quantizer applied to each
parameter's matrices (written from the spec, not from mcpm/quant), and a direct forward of the
model holding the reference's ternary weights."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpm.api import model_from_params, params_of
from mcpm.checkpoint import load_checkpoint, save_checkpoint
from mcpm.config import ConfigError, ModelConfig, OptimizerConfig, QuantConfig, ScheduleConfig
from mcpm.model import MiniCPM4
from mcpm.quant import qat
from mcpm.train.loss import cross_entropy_sums
from mcpm.train.optimizer import make_optimizer
from mcpm.train.schedule import wsd_schedule
from mcpm.train.step import init_state, make_eval_step, make_train_step

from test_train_loop import config, source

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, dim_model_base=8,
                    eos_token_id=(2,), tie_word_embeddings=False)
SCHED = ScheduleConfig(peak_lr=1e-2, warmup_steps=0, decay_fraction=0.0)


def ref_ternary(w, in_axes, group):
    """float64: the matrices of ``w`` (input axes ``in_axes`` after an optional layer axis
    kept apart) ternarized with absmean scales per matrix (group 0) or per group of input rows."""
    w = np.asarray(w, np.float64)
    layered = w.ndim > 2 and in_axes[0] == 1
    lead = w.shape[:1] if layered else ()
    rest = w.shape[1:] if layered else w.shape
    n_in = int(np.prod([rest[a - len(lead)] for a in in_axes]))
    perm = [a - len(lead) for a in in_axes] + [a for a in range(len(rest))
                                               if a + len(lead) not in in_axes]
    out = np.empty_like(w)
    for i in (range(w.shape[0]) if layered else [None]):
        x = w[i] if layered else w
        m = np.transpose(x, perm).reshape(n_in, -1)
        g = group or n_in
        res = np.zeros_like(m)
        for j in range(0, n_in, g):
            for c in range(m.shape[1] if group else 1):
                cols = slice(c, c + 1) if group else slice(None)
                block = m[j:j + g, cols]
                s = np.abs(block).mean()
                res[j:j + g, cols] = 0 if s == 0 else np.clip(np.round(block / s), -1, 1) * s
        back = np.transpose(res.reshape([x.shape[p] for p in perm]), np.argsort(perm))
        if layered:
            out[i] = back
        else:
            out[...] = back
    return out


# the input axes of each parameter's matmul (after the layer axis)
IN_AXES = {"q": (1,), "k": (1,), "v": (1,), "o": (1, 2), "gate": (1,), "up": (1,), "down": (1,),
           "lm_head": (0,), "embed": (1,)}


def random_params(seed=0, cfg=MODEL):
    return {k: np.array(v) for k, v in params_of(MiniCPM4(cfg, rngs=nnx.Rngs(seed))).items()}


@pytest.mark.parametrize("group", [0, 8])
def test_fake_quantize_is_the_reference_ternary_model_with_identity_gradient(group):
    q = QuantConfig(method="ternary", group_size=group, embeddings=True, head=True)
    params = random_params(1)
    params["gate"][0, :8, 0] = 0.0            # an all-zero group
    fq = jax.jit(lambda p: qat.fake_quantize(p, q, MODEL))(params)
    for name, w in params.items():
        if name.endswith("norm"):
            np.testing.assert_array_equal(fq[name], w)
            continue
        want = ref_ternary(w, IN_AXES[name], group)
        # each scale is a float32 mean of at most n = 64 * 32 values of one sign: relative error
        # below n * 2^-24 in any summation order (a flipped ternary value would be off by 100%)
        np.testing.assert_allclose(fq[name], want, rtol=w.size / 2**24, atol=0, err_msg=name)
    # the straight-through gradient of <c, fake_quantize(W)> with respect to W is c
    cot = jax.tree.map(lambda w: np.random.default_rng(2).standard_normal(w.shape), params)
    grads = jax.grad(lambda p: sum(jnp.vdot(v, cot[k]) for k, v in
                                   qat.fake_quantize(p, q, MODEL).items()))(params)
    for name in params:
        np.testing.assert_allclose(grads[name], cot[name].astype(np.float32), rtol=1e-6)


def test_quantized_names_and_switches():
    off = QuantConfig()
    assert qat.quantized_names(off, MODEL) == ()
    on = QuantConfig(method="ternary")
    assert qat.quantized_names(on, MODEL) == qat.HIDDEN_MATRICES
    tied = dataclasses.replace(MODEL, tie_word_embeddings=True)
    assert qat.quantized_names(dataclasses.replace(on, head=True), tied) == qat.HIDDEN_MATRICES


def test_stats_against_numpy():
    q = QuantConfig(method="ternary", group_size=16)
    params = random_params(3)
    stats = jax.jit(lambda p: qat.quant_stats(p, q, MODEL))(params)
    w = params["o"]                                   # [L, N, D, H] -> [L, N*D, H]
    m = w.reshape(w.shape[0], -1, w.shape[-1]).astype(np.float64)
    groups = m.reshape(m.shape[0], -1, 16, m.shape[-1])
    s = np.abs(groups).mean(axis=2)
    zeros = np.mean(np.round(groups / s[:, :, None, :]) == 0)
    # float32 sums of positive terms: relative error below (terms) * 2^-24 in any order
    np.testing.assert_allclose(stats["quant_zeros_o"], zeros, atol=1e-6)
    np.testing.assert_allclose(stats["quant_scale_o"], s.mean(), rtol=(s.size + 16) / 2**24)
    np.testing.assert_allclose(stats["quant_scale_min_o"], s.min(), rtol=16 / 2**24)
    np.testing.assert_allclose(stats["quant_scale_max_o"], s.max(), rtol=16 / 2**24)


def test_distill_kl_against_numpy():
    rng = np.random.default_rng(4)
    s, t = rng.standard_normal((2, 2, 5, 7)) * 3
    w = rng.random((2, 5)) > 0.3
    temp = 2.0

    def log_softmax(x):
        x = x / temp
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - x.max(-1, keepdims=True)
    lt, ls = log_softmax(t), log_softmax(s)
    want = (np.exp(lt) * (lt - ls)).sum(-1)[w].sum() * temp ** 2
    got = qat.distill_kl_sum(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(w, jnp.float32), temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def batch(seed=5, b=2, t=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (b, t + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            "segment_ids": np.ones((b, t), np.int32)}


def reference_loss_and_kl(params, group, data, temp=1.0, cfg=MODEL):
    """The ternary model's mean loss (reference weights) and its mean KL from the float model."""
    tern = {k: (ref_ternary(v, IN_AXES[k], group).astype(np.float32)
                if k in qat.HIDDEN_MATRICES else v) for k, v in params.items()}
    logits = [model_from_params(cfg, p)(jnp.asarray(data["inputs"]),
                                          positions=jnp.asarray(data["positions"]))
              for p in (tern, params)]
    sums = cross_entropy_sums(logits[0], data["targets"], data["weights"])
    n = float(sums["tokens"])
    kl = qat.distill_kl_sum(logits[0], logits[1], jnp.asarray(data["weights"]), temp)
    return float(sums["nll"]) / n, float(kl) / n


@pytest.mark.parametrize("group", [0, 16])
def test_qat_step_forward_is_ternary_and_updates_the_float_weights(group):
    q = QuantConfig(method="ternary", group_size=group)
    params = random_params(6)
    tx = make_optimizer(params, MODEL, OptimizerConfig(), SCHED, total_steps=10)
    step = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10), quant=q))
    data = batch()
    state, metrics = step(init_state(jax.tree.map(jnp.asarray, params), tx), data)
    want, _ = reference_loss_and_kl(params, group, data)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    for name in qat.HIDDEN_MATRICES:
        new = np.asarray(state["params"][name])
        assert not np.array_equal(new, params[name]), name      # the latent weights moved
        # ... and stay float: far more distinct values than a ternary matrix's 3 per group
        assert np.unique(new[0]).size > 3 * new[0].size // max(group or new[0].size, 1) + 3
    assert 0.0 < float(metrics["quant_zeros_q"]) < 1.0
    # the eval step measures the same ternary model
    ev = jax.jit(make_eval_step(MODEL, quant=q))(jax.tree.map(jnp.asarray, params), data)
    np.testing.assert_allclose(float(ev["nll"] / ev["tokens"]), want, rtol=2e-5)


def test_distillation_step_logs_the_kl_from_the_float_teacher():
    q = QuantConfig(method="ternary", distill_weight=0.5, distill_temperature=2.0)
    # a wide initialisation: logits of order 1, so the KL (a difference of log-probabilities)
    # stands far above their float32 rounding (~1e-7 of each logit)
    cfg = dataclasses.replace(MODEL, initializer_range=2.0)
    params = random_params(7, cfg)
    tx = make_optimizer(params, cfg, OptimizerConfig(), SCHED, total_steps=10)
    step = jax.jit(make_train_step(cfg, tx, wsd_schedule(SCHED, 10), quant=q))
    data = batch(8)
    state = init_state(jax.tree.map(jnp.asarray, params), tx, teacher=True)
    new, metrics = step(state, data)
    loss, kl = reference_loss_and_kl(params, 0, data, temp=2.0, cfg=cfg)
    assert kl > 1e-2
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4)
    # the teacher is frozen; the student moved
    for name in params:
        np.testing.assert_array_equal(new["teacher"][name], params[name])
    assert not np.array_equal(new["params"]["q"], params["q"])


# ------------------------------------------------------------------------------------------
# train.init_from and the ternary checkpoint a QAT run writes
def float_checkpoint(tmp_path, cfg):
    params = params_of(MiniCPM4(cfg.model, rngs=nnx.Rngs(11)))
    return save_checkpoint(tmp_path / "float", cfg.model, params), params


def test_qat_from_a_checkpoint_writes_a_ternary_model(tmp_path):
    base = config(tmp_path / "run")
    ckpt, params = float_checkpoint(tmp_path, base)
    cfg = config(tmp_path / "run", "train.steps=2", f"train.init_from={ckpt}",
                 "quant.method=ternary", "quant.group_size=32", "train.eval_batches=0")
    out = train_run(cfg)
    assert out["note"].startswith("fresh optimizer and schedule on the weights of")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == 0.0                      # step 0 of a fresh warm-up
    assert {"quant_zeros_q", "quant_scale_down"} <= set(rows[0])
    info = json.loads((tmp_path / "run" / "model" / "quant.json").read_text())
    assert info == {"method": "ternary", "group_size": 32, "tensors": list(qat.HIDDEN_MATRICES)}
    _, _, saved = load_checkpoint(tmp_path / "run" / "model")
    for name in qat.HIDDEN_MATRICES:
        m = np.asarray(qat.as_matrices(name, saved[name]))
        q, s = qat.recover_ternary(m, 32, name)
        assert set(np.unique(q)) <= {-1, 0, 1}
        np.testing.assert_array_equal(np.asarray(qat.from_matrices(
            name, jnp.asarray(q * np.repeat(s, 32, axis=-2)), saved[name].shape)), saved[name])
    assert np.unique(saved["embed"]).size > 1000       # the embeddings stay float


def train_run(cfg):
    from mcpm.train.loop import train
    return train(cfg, data=source(cfg), progress=False)


def test_init_from_loads_the_weights_into_a_fresh_state(tmp_path, monkeypatch):
    base = config(tmp_path / "run")
    ckpt, params = float_checkpoint(tmp_path, base)
    cfg = config(tmp_path / "run", "train.steps=1", f"train.init_from={ckpt}",
                 "train.eval_batches=0")
    from mcpm.train import program as program_mod
    seen = {}
    real = program_mod.build_train_program

    def spy(c, *a, **k):
        p = real(c, *a, **k)
        orig = p.init_from

        def init_from(x):
            seen["params"] = x
            st = orig(x)
            seen["state"] = jax.device_get(st)
            return st
        return dataclasses.replace(p, init_from=init_from)
    monkeypatch.setattr("mcpm.train.loop.build_train_program", spy)
    train_run(cfg)
    for name, w in params.items():
        np.testing.assert_array_equal(seen["state"]["params"][name], w)
    assert int(seen["state"]["step"]) == 0
    mu = jax.tree.leaves(seen["state"]["opt_state"])
    assert all(not np.any(np.asarray(x)) for x in mu if np.ndim(x) and np.size(x) > 1)


def test_init_from_refuses_another_architecture_and_a_ternary_model(tmp_path):
    base = config(tmp_path / "run")
    ckpt, params = float_checkpoint(tmp_path, base)
    wider = config(tmp_path / "run2", f"train.init_from={ckpt}", "model.intermediate_size=128")
    with pytest.raises(ConfigError, match=r"model.intermediate_size: 96 there, 128 here"):
        train_run(wider)
    assert not (tmp_path / "run2").exists()          # refused before anything was written
    tern = save_checkpoint(tmp_path / "tern", base.model, params, extra_files={
        qat.QUANT_FILE: json.dumps(qat.quant_info(QuantConfig(method="ternary"), base.model))})
    twice = config(tmp_path / "run3", f"train.init_from={tern}", "quant.method=ternary")
    with pytest.raises(ConfigError, match="already a ternary model"):
        train_run(twice)
    assert not (tmp_path / "run3").exists()


def test_quant_config_errors():
    with pytest.raises(ConfigError, match="does not divide the input dimension of "
                                          r"intermediate_size \(down\) = 96"):
        config("/tmp/x", "quant.method=ternary", "quant.group_size=64")
    with pytest.raises(ConfigError, match="need quant.method=ternary"):
        config("/tmp/x", "quant.group_size=8")
    with pytest.raises(ConfigError, match="train.init_from"):
        config("/tmp/x", "quant.method=ternary", "quant.distill_weight=1")


def test_qat_in_bfloat16_with_remat_and_accumulation_runs_the_ternary_model():
    """bfloat16 compute casts q * s to bfloat16, which is q times the rounded scale: the logits
    are the reference ternary model's up to bfloat16 rounding, far closer to them than the
    float model's are (a random model's logits are small, so its losses say too little)."""
    from mcpm.train.step import ModelApply
    cfg = dataclasses.replace(MODEL, compute_dtype="bfloat16", remat="full")
    q = QuantConfig(method="ternary", group_size=16)
    params = random_params(9)
    data = batch(10, b=4)
    ids, pos = jnp.asarray(data["inputs"]), jnp.asarray(data["positions"])
    tern = {k: (ref_ternary(v, IN_AXES[k], 16).astype(np.float32)
                if k in qat.HIDDEN_MATRICES else v) for k, v in params.items()}
    want = np.asarray(model_from_params(MODEL, tern)(ids, positions=pos))
    float_gap = np.abs(np.asarray(model_from_params(MODEL, params)(ids, positions=pos)) - want)
    got = jax.jit(lambda p: ModelApply(cfg, q).model(p)(ids, positions=pos))(params)
    gap = np.abs(np.asarray(got) - want)
    assert gap.max() < 0.25 * float_gap.max(), (gap.max(), float_gap.max())
    # the step under bfloat16, remat and accumulation updates the float32 latent weights
    tx = make_optimizer(params, cfg, OptimizerConfig(), SCHED, total_steps=10)
    step = jax.jit(make_train_step(cfg, tx, wsd_schedule(SCHED, 10), quant=q, accum_steps=2))
    state, metrics = step(init_state(jax.tree.map(jnp.asarray, params), tx), data)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(np.asarray(state["params"]["down"]), params["down"])
    assert state["params"]["down"].dtype == jnp.float32
