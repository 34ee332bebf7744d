"""The train step: loss and gradients against a direct computation, accumulation equal to one
big batch, skipped non-finite updates, donation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.config import ModelConfig, OptimizerConfig, ScheduleConfig
from mcpm.model import MiniCPM4
from mcpm.train.loss import cross_entropy
from mcpm.train.optimizer import make_optimizer
from mcpm.train.schedule import wsd_schedule
from mcpm.train.step import init_state, make_train_step

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, dim_model_base=8,
                    eos_token_id=(2,))
SCHED = ScheduleConfig(peak_lr=1e-2, warmup_steps=0, decay_fraction=0.0)


def setup(seed=0):
    params = nnx.to_pure_dict(nnx.state(MiniCPM4(MODEL, rngs=nnx.Rngs(seed)), nnx.Param))
    tx = make_optimizer(params, MODEL, OptimizerConfig(), SCHED, total_steps=10)
    return params, tx


def batch_of(seed, b=4, t=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[1, 7:] = 2          # a packed second document
    seg[2, 9:] = 0          # padding
    pos = np.where(seg == 2, np.arange(t) - 7, np.arange(t))
    weights = (seg != 0).astype(np.float32)
    weights[1, 6] = 0.0     # last token of document 1: its target is document 2's first
    return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:]),
            "weights": jnp.asarray(weights), "positions": jnp.asarray(pos, jnp.int32),
            "segment_ids": jnp.asarray(seg)}


def test_one_step_equals_direct_loss_gradient_and_optax_update():
    params, tx = setup()
    batch = batch_of(1)
    step = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10)))
    state, metrics = step(init_state(params, tx), batch)
    model = MiniCPM4(MODEL, rngs=nnx.Rngs(0))

    def direct(m):
        logits = m(batch["inputs"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
        return cross_entropy(logits, batch["targets"], batch["weights"])[0]
    loss, grads = nnx.value_and_grad(direct)(model)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    g = nnx.to_pure_dict(grads)
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               np.sqrt(sum(float((x ** 2).sum()) for x in g.values())), rtol=1e-5)
    updates, _ = tx.update(g, tx.init(params), params)
    want = jax.tree.map(lambda p, u: p + u, params, updates)
    # Adam's first step is g / (|g| + eps): float32 rounding of a tiny g moves it by ~1e-3 of
    # the lr (1e-2) at most
    for name in params:
        np.testing.assert_allclose(np.asarray(state["params"][name]), np.asarray(want[name]),
                                   rtol=1e-5, atol=2e-5, err_msg=name)
    assert int(state["step"]) == 1 and bool(metrics["finite"])


def test_accumulation_equals_the_whole_batch():
    params, tx = setup(1)
    batch = batch_of(2, b=4)
    one = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10)))
    acc = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10), accum_steps=2))
    s1, m1 = one(init_state(params, tx), batch)
    s2, m2 = acc(init_state(params, tx), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(np.asarray(s2["params"][name]), np.asarray(s1["params"][name]),
                                   rtol=1e-5, atol=2e-5, err_msg=name)


def test_non_finite_gradients_skip_the_update_and_count():
    params, tx = setup(2)
    params = dict(params, attn_norm=params["attn_norm"].at[0, 0].set(jnp.nan))
    step = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10)), donate_argnums=0)
    state = init_state(params, tx)
    before = jax.tree.map(np.asarray, state["params"])
    state, metrics = step(state, batch_of(3))
    assert not bool(metrics["finite"]) and int(state["skipped"]) == 1
    for name in before:
        np.testing.assert_array_equal(np.asarray(state["params"][name]), before[name])
    state, metrics = step(state, batch_of(4))
    assert int(metrics["skipped"]) == 2 and int(state["step"]) == 2


def test_a_batch_without_segment_ids_is_one_document_per_row():
    """As all-ones segment ids: causal over the whole row (the form cuDNN attention takes)."""
    params, tx = setup(4)
    batch = batch_of(6)
    whole = dict(batch, segment_ids=jnp.ones_like(batch["segment_ids"]),
                 positions=jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (4, 12)),
                 weights=jnp.ones_like(batch["weights"]))
    bare = {k: v for k, v in whole.items() if k != "segment_ids"}
    step = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, 10)))
    _, with_ids = step(init_state(params, tx), whole)
    _, without = step(init_state(params, tx), bare)
    # the same masked arithmetic (only where the mask comes from differs): a few ulps at most
    np.testing.assert_allclose(float(without["loss"]), float(with_ids["loss"]),
                               rtol=8 * np.finfo(np.float32).eps)


def test_the_chunked_loss_gives_the_same_step():
    """loss_chunk = 5 on T = 12 (a ragged last chunk), untied head: same loss, gradient norm and
    update as the whole-sequence loss, up to float32 reassociation of the sums."""
    cfg = ModelConfig(**{**MODEL.__dict__, "tie_word_embeddings": False})
    params = nnx.to_pure_dict(nnx.state(MiniCPM4(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    tx = make_optimizer(params, cfg, OptimizerConfig(), SCHED, total_steps=10)
    batch = batch_of(5)
    whole = jax.jit(make_train_step(cfg, tx, wsd_schedule(SCHED, 10), z_loss=1e-3))
    chunked = jax.jit(make_train_step(cfg, tx, wsd_schedule(SCHED, 10), z_loss=1e-3,
                                      loss_chunk=5))
    s1, m1 = whole(init_state(params, tx), batch)
    s2, m2 = chunked(init_state(params, tx), batch)
    for key in ("loss", "z", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, err_msg=key)
    for name in params:
        np.testing.assert_allclose(np.asarray(s2["params"][name]), np.asarray(s1["params"][name]),
                                   rtol=1e-5, atol=2e-5, err_msg=name)


def test_float32_matmuls_are_highest_precision_unless_asked_otherwise():
    """The step's lowered program: every float32 dot (forward and backward) asks for HIGHEST
    precision by default (GPUs would otherwise use TF32, TPUs bfloat16 passes), DEFAULT with
    matmul_precision=default, and bfloat16 compute asks for nothing."""
    def dot_precisions(cfg):
        params = jax.eval_shape(lambda: nnx.to_pure_dict(
            nnx.state(MiniCPM4(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
        tx = make_optimizer(params, cfg, OptimizerConfig(), SCHED, total_steps=10)
        state = jax.eval_shape(lambda p: init_state(p, tx), params)
        step = jax.jit(make_train_step(cfg, tx, wsd_schedule(SCHED, 10)))
        text = step.trace(state, batch_of(0)).lower().as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert len(dots) > 20
        # one entry per dot: the float32 ones' precisions, and which dots have no f32 operands
        out = []
        for line in dots:
            m = re.search(r"precision = \[(\w+), (\w+)\]", line)
            operands = line.split(":")[-1].split("->")[0]
            out.append((m.groups() if m else ("DEFAULT", "DEFAULT"), "xf32>" in operands))
        return out

    def f32_precisions(dots):
        return {p for (p, f32) in dots if f32 for p in p}

    assert f32_precisions(dot_precisions(MODEL)) == {"HIGHEST"}
    # the flash kernel's custom backward is traced outside the model's call
    flash = ModelConfig(**{**MODEL.__dict__, "attention_impl": "flash"})
    assert f32_precisions(dot_precisions(flash)) == {"HIGHEST"}
    fast = dot_precisions(ModelConfig(**{**MODEL.__dict__, "matmul_precision": "default"}))
    assert f32_precisions(fast) == {"DEFAULT"}
    bf16 = dot_precisions(ModelConfig(**{**MODEL.__dict__, "compute_dtype": "bfloat16"}))
    assert {p for (p, _) in bf16 for p in p} == {"DEFAULT"}
