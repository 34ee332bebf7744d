"""The train step: forward, next-token loss, gradients (accumulated over micro-batches),
clipping + AdamW via the optax chain, and a skipped update when anything is not finite.

Train state is a plain dict (``step``, ``params`` by mcpm name, ``opt_state``, ``skipped``),
so orbax, optax and the sharding rules all see parameters under their mcpm names. The step is
a pure function meant for ``jax.jit(..., donate_argnums=0)``; see :mod:`mcpm.train.loop`.
Batch: ``inputs``, ``targets``, ``weights``, ``positions``, ``segment_ids``, all ``[B, T]``;
without ``segment_ids`` every row is one document.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcpm.config import ModelConfig
from mcpm.model.minicpm4 import MiniCPM4, precision_scope
from mcpm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


class ModelApply:
    """Runs MiniCPM4 on a pure ``{name: array}`` parameter dict (the model's graph is built once,
    abstractly; each call only merges the arrays into it)."""

    def __init__(self, cfg: ModelConfig):
        abstract = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self._template = nnx.split(abstract)

    def model(self, params: dict) -> MiniCPM4:
        state = jax.tree.map(lambda x: x, self._template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def loss_sums(model: MiniCPM4, batch: dict, loss_chunk: int = 0) -> dict:
    """The batch's next-token loss sums (``nll``, ``z``, ``tokens``) under ``model``; without
    ``segment_ids`` every row is one document (cuDNN attention can take such a batch)."""
    out = model(batch["inputs"], positions=batch["positions"],
                segment_ids=batch.get("segment_ids"), return_hidden=bool(loss_chunk))
    if loss_chunk:
        return chunked_cross_entropy_sums(out, model.logits, batch["targets"], batch["weights"],
                                          loss_chunk)
    return cross_entropy_sums(out, batch["targets"], batch["weights"])


def make_eval_step(model_cfg: ModelConfig, *, loss_chunk: int = 0,
                   activation_rules: Callable[[], contextlib.AbstractContextManager] | None = None):
    """``eval_step(params, batch) -> {"nll", "tokens"}``: the summed next-token loss of a batch
    (the train step's forward and loss, without gradients); the caller sums batches and
    divides, so every held-out token weighs the same."""
    apply = ModelApply(model_cfg)
    hints = activation_rules or contextlib.nullcontext

    def eval_step(params: dict, batch: dict):
        with hints(), precision_scope(model_cfg):
            sums = loss_sums(apply.model(params), batch, loss_chunk)
        return {"nll": sums["nll"], "tokens": sums["tokens"]}

    return eval_step


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "skipped": jnp.zeros((), jnp.int32)}


def _micro_batches(batch: dict, accum: int) -> dict:
    """``[B, T]`` -> ``[accum, B / accum, T]`` taking every accum-th row, so each micro-batch is
    spread over all the devices that hold the batch."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return {k: split(v) for k, v in batch.items()}


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    lr_schedule: Callable, *, z_loss: float = 0.0, accum_steps: int = 1,
                    loss_chunk: int = 0,
                    activation_rules: Callable[[], contextlib.AbstractContextManager] | None = None):
    """``step(state, batch) -> (state, metrics)``; metrics are float32/int32 scalars:
    loss (mean nll over target tokens), z, tokens, grad_norm, lr, finite, skipped.

    ``loss_chunk`` > 0 makes the logits that many positions at a time
    (:func:`mcpm.train.loss.chunked_cross_entropy_sums`): the same loss without ``[B, T, V]``.

    ``activation_rules``: makes the context in which the model's activation sharding hints
    are resolved while tracing (``lambda: mcpm.sharding.activation_rules(mesh, rules)``).
    """
    apply = ModelApply(model_cfg)
    hints = activation_rules or contextlib.nullcontext

    def sums_and_grads(params, micro):
        def objective(p):
            sums = loss_sums(apply.model(p), micro, loss_chunk)
            return sums["nll"] + z_loss * sums["z"], sums
        # the backward pass is traced here, outside the model's call: the same precision
        with precision_scope(model_cfg):
            return jax.grad(objective, has_aux=True)(params)[::-1]

    def step(state: dict, batch: dict):
        with hints():
            return _step(state, batch)

    def _step(state: dict, batch: dict):
        params = state["params"]
        if accum_steps == 1:
            sums, grads = sums_and_grads(params, batch)
        else:
            def body(carry, micro):
                sums, grads = sums_and_grads(params, micro)
                return jax.tree.map(jnp.add, carry, (sums, grads)), None
            zero = ({"nll": 0.0, "z": 0.0, "tokens": 0.0},
                    jax.tree.map(jnp.zeros_like, params))
            (sums, grads), _ = jax.lax.scan(body, zero, _micro_batches(batch, accum_steps))
        denom = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = sums["nll"] / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1,
                     "params": keep(new_params, params),
                     "opt_state": keep(new_opt, state["opt_state"]),
                     "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "z": sums["z"] / denom, "tokens": sums["tokens"],
                   "grad_norm": grad_norm, "lr": jnp.asarray(lr_schedule(state["step"])),
                   "finite": finite, "skipped": new_state["skipped"]}
        return new_state, metrics

    return step
