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


def chunked_cross_entropy_sums(hidden_bth: jax.Array, head, targets_bt: jax.Array,
                               weights_bt: jax.Array, chunk: int) -> dict[str, jax.Array]:
    """:func:`cross_entropy_sums` of ``head(hidden)`` without the ``[B, T, V]`` logits.

    The sequence is cut into ``chunk``-position pieces; each piece's logits are made, reduced
    to its sums and dropped, and rematerialised in the backward pass, so the float32 logits
    take ``B x chunk x V`` at a time instead of ``B x T x V`` (4.8 GB at 8 x 2048 tokens and a
    73K vocabulary). ``head``: ``[B, t, H] -> [B, t, V]`` logits, closing over its weights.
    """
    b, t, h = hidden_bth.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # weight-0 padding positions add nothing to any sum
        hidden_bth = jnp.pad(hidden_bth, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    pieces = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def piece_sums(h_bch, tgt_bc, w_bc):
        return cross_entropy_sums(head(h_bch), tgt_bc, w_bc)

    def body(total, xs):
        sums = piece_sums(*xs)
        return {k: total[k] + sums[k] for k in total}, None

    zero = {k: jnp.zeros((), jnp.float32) for k in ("nll", "z", "tokens")}
    total, _ = jax.lax.scan(body, zero, (pieces(hidden_bth), pieces(targets_bt),
                                         pieces(weights_bt)))
    return total
