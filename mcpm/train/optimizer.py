"""AdamW with MiniCPM's muP learning-rate multipliers and the WSD schedule (optax).

Update of parameter p at step s: ``-lr(s) * mult(p) * (adam(g) + wd * p)`` (decoupled decay,
none on norms), after clipping the gradients' global norm. ``mult`` is ``1 / m`` for hidden
matrices under muP and 1 otherwise; see :class:`mcpm.config.OptimizerConfig`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcpm.config import ModelConfig, OptimizerConfig, ScheduleConfig
from mcpm.sharding import param_name
from mcpm.train.schedule import wsd_schedule

HIDDEN_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
NORMS = ("attn_norm", "mlp_norm", "final_norm")
EMBEDDINGS = ("embed",)


def _leaf_name(path) -> str:
    name = param_name(path)
    if name is None:
        raise ValueError(f"no parameter name on tree path {jax.tree_util.keystr(path)}")
    return name


def lr_multipliers(params, model_cfg: ModelConfig, cfg: OptimizerConfig):
    """A tree like ``params`` of python floats: each parameter's lr multiplier."""
    m = model_cfg.width_mult

    def mult(path, _):
        name = _leaf_name(path)
        if not cfg.mup:
            return 1.0
        if name in HIDDEN_MATRICES:
            return 1.0 / m
        if name in EMBEDDINGS and cfg.mup_embedding_lr == "scaled":
            return 1.0 / m
        return 1.0
    return jax.tree_util.tree_map_with_path(mult, params)


def weight_decay_mask(params):
    """True where weight decay applies: every parameter except the norms."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in NORMS, params)


def _scale_per_leaf(multipliers) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, multipliers), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(params, model_cfg: ModelConfig, cfg: OptimizerConfig,
                   schedule: ScheduleConfig, total_steps: int,
                   decay_start: int | None = None) -> optax.GradientTransformation:
    """The optimizer for ``params`` (any pytree whose leaves sit under mcpm parameter names)."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask(params)),
              _scale_per_leaf(lr_multipliers(params, model_cfg, cfg)),
              optax.scale_by_learning_rate(wsd_schedule(schedule, total_steps, decay_start))]
    return optax.chain(*parts)
