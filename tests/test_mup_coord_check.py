"""muP coordinate check (training spec 2, after microsoft/mup): how much a hidden layer's
output moves in the first Adam steps must not depend on the width under MiniCPM's muP
(hidden-matrix lr / m), while standard parametrisation (lr for all) grows with the width.

The probe is layer 0's query and gate projections of the (fixed) normalised embedding input:
``mean |x W_after - x W_init|`` after each step, widths 64 to 512 (m = 1 to 8)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.config import ModelConfig, OptimizerConfig, ScheduleConfig
from mcpm.model import MiniCPM4
from mcpm.model.layers import rms_norm
from mcpm.train.optimizer import make_optimizer
from mcpm.train.schedule import wsd_schedule
from mcpm.train.step import init_state, make_train_step

STEPS = 3


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, (8, 65))
    ids[:, 1::2] = ids[:, 0:-1:2]
    return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32),
            "targets": jnp.asarray(ids[:, 1:], jnp.int32), "weights": jnp.ones((8, 64)),
            "positions": jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (8, 64)),
            "segment_ids": jnp.ones((8, 64), jnp.int32)}


def movement(width: int, mup: bool) -> np.ndarray:
    """[steps, 2]: mean |change| of layer 0's q and gate outputs after each step."""
    cfg = ModelConfig(vocab_size=256, hidden_size=width, intermediate_size=width * 5 // 2,
                      num_hidden_layers=1, num_attention_heads=width // 32,
                      num_key_value_heads=width // 64, dim_model_base=64, eos_token_id=(2,))
    params = nnx.to_pure_dict(nnx.state(MiniCPM4(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    sched = ScheduleConfig(peak_lr=0.01, warmup_steps=0, decay_fraction=0.0)
    tx = make_optimizer(params, cfg, OptimizerConfig(mup=mup, weight_decay=0.0, clip_norm=0.0),
                        sched, STEPS)
    step = jax.jit(make_train_step(cfg, tx, wsd_schedule(sched, STEPS)))
    b = batch()

    def probe(p):
        x = rms_norm(p["embed"][b["inputs"]] * cfg.scale_emb, p["attn_norm"][0], cfg.rms_norm_eps)
        return jnp.einsum("bth,hnd->btnd", x, p["q"][0]), x @ p["gate"][0]
    start = probe(params)
    state, out = init_state(params, tx), []
    for _ in range(STEPS):
        state, _ = step(state, b)
        out.append([float(jnp.abs(a - a0).mean()) for a, a0 in zip(probe(state["params"]), start)])
    return np.array(out)


def test_hidden_layer_updates_are_flat_in_width_under_mup_and_grow_without():
    mup = np.stack([movement(w, True) for w in (64, 128, 512)])      # [width, step, probe]
    spread = mup.max(axis=0) / mup.min(axis=0)
    assert (spread < 1.5).all(), spread                                # 8x the width
    standard = movement(512, False)
    assert (standard / mup[0] > 2).all(), standard / mup[0]            # m = 1: both the same
