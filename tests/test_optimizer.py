"""AdamW with muP multipliers against a numpy statement of the update, on model-shaped params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.config import ModelConfig, OptimizerConfig, ScheduleConfig
from mcpm.model.minicpm4 import param_shapes
from mcpm.train.optimizer import lr_multipliers, make_optimizer

MODEL = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, dim_model_base=16,
                    eos_token_id=(2,), tie_word_embeddings=False)


def numpy_adamw(params, grads_seq, lrs, mult, cfg):
    """AdamW (decoupled decay, bias-corrected), global-norm clipping, per-parameter lr mult."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for step, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
        clip = min(1.0, cfg.clip_norm / norm)
        for k in p:
            g = grads[k] * clip
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g * g
            mh, vh = m[k] / (1 - cfg.b1 ** step), v2[k] / (1 - cfg.b2 ** step)
            wd = 0.0 if k.endswith("norm") else cfg.weight_decay
            p[k] = p[k] - lr * mult[k] * (mh / (np.sqrt(vh) + cfg.eps) + wd * p[k])
    return p


@pytest.mark.parametrize("emb_rule", ["unscaled", "scaled"])
def test_three_steps_match_numpy_adamw_with_mup_multipliers(emb_rule):
    rng = np.random.default_rng(7)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(MODEL).items()}
    cfg = OptimizerConfig(weight_decay=0.05, clip_norm=0.5, mup_embedding_lr=emb_rule)
    sched = ScheduleConfig(peak_lr=0.02, warmup_steps=2, decay_fraction=0.0)
    tx = make_optimizer(params, MODEL, cfg, sched, total_steps=10)
    state = tx.init(params)
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
                 for _ in range(3)]
    p = jax.tree.map(jnp.asarray, params)
    for grads in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    m = MODEL.width_mult
    assert m == 4
    mult = {k: (1 / m if k in ("q", "k", "v", "o", "gate", "up", "down")
                or (k == "embed" and emb_rule == "scaled") else 1.0) for k in params}
    want = numpy_adamw(params, grads_seq, [0.0, 0.01, 0.02], mult, cfg)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_multipliers_by_name_and_without_mup():
    params = {k: np.zeros(s, np.float32) for k, s in param_shapes(MODEL).items()}
    mult = lr_multipliers(params, MODEL, OptimizerConfig())
    assert mult["q"] == mult["down"] == 0.25
    assert mult["embed"] == mult["lm_head"] == mult["attn_norm"] == mult["final_norm"] == 1.0
    flat = lr_multipliers(params, MODEL, OptimizerConfig(mup=False))
    assert set(flat.values()) == {1.0}
