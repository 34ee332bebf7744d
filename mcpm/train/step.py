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

from mcpm.config import ModelConfig, QuantConfig
from mcpm.model.minicpm4 import MiniCPM4, precision_scope
from mcpm.quant.qat import distill_kl_sum, fake_quantize, quant_stats
from mcpm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


class ModelApply:
    """Runs MiniCPM4 on a pure ``{name: array}`` parameter dict (the model's graph is built once,
    abstractly; each call only merges the arrays into it). With ``quant`` enabled the model
    runs on the straight-through quantized parameters (:func:`mcpm.quant.qat.fake_quantize`):
    its forward is the quantized model's, its gradient reaches the float parameters."""

    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None):
        abstract = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self._template = nnx.split(abstract)
        self.cfg, self.quant = cfg, quant if quant is not None and quant.enabled else None

    def model(self, params: dict, *, float_weights: bool = False) -> MiniCPM4:
        """The model on ``params`` (quantized unless ``float_weights``: a distillation
        teacher)."""
        if self.quant is not None and not float_weights:
            params = fake_quantize(params, self.quant, self.cfg)
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


def distill_sums(student: MiniCPM4, teacher: MiniCPM4, batch: dict, temperature: float) -> dict:
    """:func:`loss_sums` of ``student`` plus ``kl``: the summed distillation KL from the frozen
    ``teacher`` over the target tokens (both models' whole-sequence logits)."""
    def logits(model):
        return model(batch["inputs"], positions=batch["positions"],
                     segment_ids=batch.get("segment_ids"))
    out = logits(student)
    sums = cross_entropy_sums(out, batch["targets"], batch["weights"])
    target = jax.lax.stop_gradient(logits(teacher))
    return {**sums, "kl": distill_kl_sum(out, target, batch["weights"], temperature)}


def make_eval_step(model_cfg: ModelConfig, *, loss_chunk: int = 0,
                   quant: QuantConfig | None = None,
                   activation_rules: Callable[[], contextlib.AbstractContextManager] | None = None):
    """``eval_step(params, batch) -> {"nll", "tokens"}``: the summed next-token loss of a batch
    (the train step's forward and loss, without gradients; the quantized model's under
    ``quant``); the caller sums batches and divides, so every held-out token weighs the same."""
    apply = ModelApply(model_cfg, quant)
    hints = activation_rules or contextlib.nullcontext

    def eval_step(params: dict, batch: dict):
        with hints(), precision_scope(model_cfg):
            sums = loss_sums(apply.model(params), batch, loss_chunk)
        return {"nll": sums["nll"], "tokens": sums["tokens"]}

    return eval_step


def init_state(params: dict, tx: optax.GradientTransformation, *, teacher: bool = False) -> dict:
    """A fresh train state; ``teacher`` also keeps a frozen copy of ``params`` (the
    distillation teacher, saved and restored with the state so a resume is exact)."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "skipped": jnp.zeros((), jnp.int32)}
    if teacher:
        state["teacher"] = jax.tree.map(jnp.copy, params)
    return state


def _micro_batches(batch: dict, accum: int) -> dict:
    """``[B, T]`` -> ``[accum, B / accum, T]`` taking every accum-th row, so each micro-batch is
    spread over all the devices that hold the batch."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return {k: split(v) for k, v in batch.items()}


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    lr_schedule: Callable, *, z_loss: float = 0.0, accum_steps: int = 1,
                    loss_chunk: int = 0, quant: QuantConfig | None = None,
                    activation_rules: Callable[[], contextlib.AbstractContextManager] | None = None):
    """``step(state, batch) -> (state, metrics)``; metrics are float32/int32 scalars:
    loss (mean nll over target tokens), z, tokens, grad_norm, lr, finite, skipped.

    ``quant`` (enabled): the forward runs the quantized model (straight-through gradients to
    the float parameters), ``loss`` is that model's, and the metrics add its zero fractions and
    scales per matrix (:func:`mcpm.quant.qat.quant_stats`, of the parameters the step's forward
    used). With ``quant.distill_weight`` > 0 the state holds a ``teacher`` and the objective
    adds ``distill_weight * kl`` (``kl`` per target token is logged).

    ``loss_chunk`` > 0 makes the logits that many positions at a time
    (:func:`mcpm.train.loss.chunked_cross_entropy_sums`): the same loss without ``[B, T, V]``.

    ``activation_rules``: makes the context in which the model's activation sharding hints
    are resolved while tracing (``lambda: mcpm.sharding.activation_rules(mesh, rules)``).
    """
    apply = ModelApply(model_cfg, quant)
    hints = activation_rules or contextlib.nullcontext
    distill = quant is not None and quant.enabled and quant.distill_weight > 0

    def sums_and_grads(params, micro, teacher):
        def objective(p):
            if distill:
                sums = distill_sums(apply.model(p), apply.model(teacher, float_weights=True),
                                    micro, quant.distill_temperature)
                return (sums["nll"] + z_loss * sums["z"]
                        + quant.distill_weight * sums["kl"]), sums
            sums = loss_sums(apply.model(p), micro, loss_chunk)
            return sums["nll"] + z_loss * sums["z"], sums
        # the backward pass is traced here, outside the model's call: the same precision
        with precision_scope(model_cfg):
            return jax.grad(objective, has_aux=True)(params)[::-1]

    def step(state: dict, batch: dict):
        with hints():
            return _step(state, batch)

    def _step(state: dict, batch: dict):
        params, teacher = state["params"], state.get("teacher")
        if accum_steps == 1:
            sums, grads = sums_and_grads(params, batch, teacher)
        else:
            def body(carry, micro):
                sums, grads = sums_and_grads(params, micro, teacher)
                return jax.tree.map(jnp.add, carry, (sums, grads)), None
            zero = ({"nll": 0.0, "z": 0.0, "tokens": 0.0, **({"kl": 0.0} if distill else {})},
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
        new_state = {**state, "step": state["step"] + 1,
                     "params": keep(new_params, params),
                     "opt_state": keep(new_opt, state["opt_state"]),
                     "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "z": sums["z"] / denom, "tokens": sums["tokens"],
                   "grad_norm": grad_norm, "lr": jnp.asarray(lr_schedule(state["step"])),
                   "finite": finite, "skipped": new_state["skipped"]}
        if distill:
            metrics["kl"] = sums["kl"] / denom
        if apply.quant is not None:
            metrics.update(quant_stats(params, apply.quant, model_cfg))
        return new_state, metrics

    return step
