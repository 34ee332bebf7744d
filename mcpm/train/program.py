"""The train program: one builder for the optimizer, schedule, state shardings and the jitted,
donated train step of a config on a mesh.

The loop (:mod:`mcpm.train.loop`), ahead-of-time compilation (:mod:`mcpm.train.aot`) and the
benchmarks all call :func:`build_train_program`, so the step that is compiled for a TPU slice or
timed is the step a run executes: same schedule (decay start included), z-loss, accumulation
and shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mcpm.config import Config
from mcpm.model.minicpm4 import MiniCPM4
from mcpm.sharding import activation_rules, batch_sharding, make_mesh, state_shardings
from mcpm.train.optimizer import make_optimizer
from mcpm.train.schedule import wsd_schedule
from mcpm.train.step import BATCH_KEYS, init_state, make_eval_step, make_train_step


def schedule_span(cfg: Config) -> tuple[int, int | None]:
    """(total steps, decay start or None) of the run ``cfg`` describes: a branch decay
    (``train.decay_from`` >= 0) decays from its fork step to ``decay_from + decay_steps``."""
    t = cfg.train
    if t.decay_from >= 0:
        return t.decay_from + t.decay_steps, t.decay_from
    return t.steps, None


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything a run needs to initialise, restore and step its state on ``mesh``."""

    cfg: Config
    mesh: Mesh
    total_steps: int
    decay_start: int | None
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: object          # a tree of NamedSharding shaped like the state
    batch_sharding: NamedSharding
    abstract_state: object           # ShapeDtypeStructs carrying the target shardings
    init: Callable[[], dict]         # jitted: the freshly initialised, sharded state
    init_from: Callable[[dict], dict]  # jitted: a fresh state (new optimizer) from given params
    step: Callable                   # jitted, state donated: (state, batch) -> (state, metrics)
    eval_step: Callable              # jitted: (params, batch) -> {"nll", "tokens"} sums

    def batch_spec(self, batch_size: int, seq_len: int) -> dict:
        """The step's batch argument as ShapeDtypeStructs (for ``step.trace(...).lower()``)."""
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len),
                                        "float32" if k == "weights" else "int32",
                                        sharding=self.batch_sharding)
                for k in BATCH_KEYS}


def _keeps_teacher(cfg: Config) -> bool:
    return cfg.quant.enabled and cfg.quant.distill_weight > 0


def _init_fn(cfg: Config, tx):
    def init():
        model = MiniCPM4(cfg.model, rngs=nnx.Rngs(cfg.seed))
        return init_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), tx,
                          teacher=_keeps_teacher(cfg))
    return init


def build_train_program(cfg: Config, mesh: Mesh | None = None, *,
                        batch_size: int | None = None) -> TrainProgram:
    """The train program of ``cfg`` on ``mesh`` (default: ``cfg.mesh`` over the local
    devices); ``batch_size`` (default ``cfg.data.batch_size``) sets the batch sharding."""
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    model_cfg, rules, t = cfg.model, cfg.mesh.rules, cfg.train
    total, decay_start = schedule_span(cfg)
    abstract_params = jax.eval_shape(
        lambda: nnx.to_pure_dict(nnx.state(MiniCPM4(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    tx = make_optimizer(abstract_params, model_cfg, t.optimizer, t.schedule, total, decay_start)
    schedule = wsd_schedule(t.schedule, total, decay_start)
    init = _init_fn(cfg, tx)
    shapes = jax.eval_shape(init)
    st_sh = state_shardings(shapes, model_cfg, mesh, rules)
    b_sh = batch_sharding(mesh, rules, batch_size or cfg.data.batch_size)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, st_sh)
    step = jax.jit(
        make_train_step(model_cfg, tx, schedule, z_loss=t.z_loss, accum_steps=t.accum_steps,
                        loss_chunk=t.loss_chunk, quant=cfg.quant,
                        activation_rules=lambda: activation_rules(mesh, rules)),
        in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)
    eval_step = jax.jit(
        make_eval_step(model_cfg, loss_chunk=t.loss_chunk, quant=cfg.quant,
                       activation_rules=lambda: activation_rules(mesh, rules)),
        in_shardings=(st_sh["params"], b_sh))
    return TrainProgram(cfg=cfg, mesh=mesh, total_steps=total, decay_start=decay_start, tx=tx,
                        schedule=schedule, state_shardings=st_sh, batch_sharding=b_sh,
                        abstract_state=abstract_state,
                        init=jax.jit(init, out_shardings=st_sh),
                        init_from=jax.jit(
                            lambda p: init_state(p, tx, teacher=_keeps_teacher(cfg)),
                            in_shardings=(st_sh["params"],), out_shardings=st_sh),
                        step=step,
                        eval_step=eval_step)
