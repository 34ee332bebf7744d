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


def hint_platform() -> str | None:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of the devices the innermost hint context
    resolves onto, or None outside one. A program traced for a TPU slice from another host
    (ahead-of-time compilation) is traced for those devices, not for ``jax.default_backend()``."""
    if not _RESOLVERS:
        return None
    device_set = getattr(_RESOLVERS[-1]((None,), (1,)), "device_set", None)
    return next(iter(device_set)).platform if device_set else None


def hint_partition(shapes_axes: Sequence[tuple[tuple[int, ...], Sequence[str | None]]]):
    """``(mesh, [PartitionSpec])``: where the innermost hint context puts arrays of these shapes
    and logical axes, or None outside one or on a one-device mesh (nothing to partition)."""
    if not _RESOLVERS:
        return None
    shardings = [_RESOLVERS[-1](axes, shape) for shape, axes in shapes_axes]
    mesh = getattr(shardings[0], "mesh", None)
    if mesh is None or mesh.size == 1:
        return None
    return mesh, [s.spec for s in shardings]
