"""Activation sharding hints: the model marks a few activations with logical axis names, and
the training code decides what those mean on its mesh (``mcpm.sharding.activation_rules``).

Outside such a context (inference, tests on one device) :func:`constrain` does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax

_RESOLVERS: list[Callable] = []


@contextlib.contextmanager
def activation_sharding(resolve: Callable[[Sequence[str | None], tuple[int, ...]], object]):
    """While tracing inside, ``constrain(x, axes)`` applies ``resolve(axes, x.shape)``."""
    _RESOLVERS.append(resolve)
    try:
        yield
    finally:
        _RESOLVERS.pop()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    if not _RESOLVERS:
        return x
    return jax.lax.with_sharding_constraint(x, _RESOLVERS[-1](logical_axes, x.shape))
