"""Next-token cross-entropy over packed batches, with MiniCPM-style optional z-loss.

The data pipeline gives, per slot, the input token, the target token and a loss weight (0 for
padding and for the last token of each document, whose "next token" belongs to another one).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array
                       ) -> dict[str, jax.Array]:
    """Weighted sums (float32): ``nll`` of the targets, ``z`` = logsumexp^2, ``tokens`` = weights.
    Sums, not means, so that micro-batches of a gradient-accumulation step add up exactly."""
    logits = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    w = weights_bt.astype(jnp.float32)
    return {"nll": ((lse_bt - target_logit) * w).sum(), "z": (jnp.square(lse_bt) * w).sum(),
            "tokens": w.sum()}


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean of ``-log p(target)`` in float32, plus ``z_loss * mean(logsumexp^2)``.

    Returns (loss to differentiate, metrics: ``ce``, ``z``, ``tokens`` = sum of weights).
    """
    sums = cross_entropy_sums(logits_btv, targets_bt, weights_bt)
    denom = jnp.maximum(sums["tokens"], 1.0)
    ce, z = sums["nll"] / denom, sums["z"] / denom
    return ce + z_loss * z, {"ce": ce, "z": z, "tokens": sums["tokens"]}
