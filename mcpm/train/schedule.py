"""The WSD (warm-up, stable, decay) learning-rate schedule of training spec section 1.

``lr(s) = peak * s / W`` for ``s < W``; ``peak`` until the decay starts at step ``T``; then
``peak * f(s - T)`` for the ``D`` decay steps, and the last value after them. Decay shapes
``f(x)``: exponential ``0.5 ** (x / half_life)``; linear ``1 - (1 - r) x / D``; cosine
``r + (1 - r) (1 + cos(pi x / D)) / 2``; 1-sqrt ``r + (1 - r) (1 - sqrt(x / D))``, with ``r`` the
final fraction. Built from optax schedule pieces so it jit-compiles as a function of the step.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from mcpm.config import ScheduleConfig


def decay_start_step(total_steps: int, cfg: ScheduleConfig) -> int:
    """T: the first decay step, so that the decay covers ``decay_fraction`` of the run."""
    return total_steps - int(round(cfg.decay_fraction * total_steps))


def _decay(cfg: ScheduleConfig, decay_steps: int) -> optax.Schedule:
    peak, r = cfg.peak_lr, cfg.final_fraction
    n = max(decay_steps, 1)
    if cfg.decay_shape == "exponential":
        return optax.exponential_decay(peak, transition_steps=cfg.half_life_steps, decay_rate=0.5)
    if cfg.decay_shape == "linear":
        return optax.linear_schedule(peak, r * peak, n)
    if cfg.decay_shape == "cosine":
        return optax.cosine_decay_schedule(peak, n, alpha=r)

    def one_minus_sqrt(x):
        frac = jnp.clip(jnp.asarray(x, jnp.float32) / n, 0.0, 1.0)
        return peak * (r + (1.0 - r) * (1.0 - jnp.sqrt(frac)))
    return one_minus_sqrt


def wsd_schedule(cfg: ScheduleConfig, total_steps: int,
                 decay_start: int | None = None) -> optax.Schedule:
    """The lr at each optimizer step of a run of ``total_steps``.

    ``decay_start`` overrides T (a branch decay forks the stable phase at its own step); the
    decay then runs to ``total_steps``.
    """
    start = decay_start_step(total_steps, cfg) if decay_start is None else decay_start
    warmup = min(cfg.warmup_steps, start)
    pieces = [optax.linear_schedule(0.0, cfg.peak_lr, warmup) if warmup else None,
              optax.constant_schedule(cfg.peak_lr),
              _decay(cfg, total_steps - start)]
    boundaries = [warmup, start]
    if pieces[0] is None:
        pieces, boundaries = pieces[1:], boundaries[1:]
    return optax.join_schedules(pieces, boundaries)
