"""Device mesh and the logical-axis rules that place parameters, batches and activations on it.

Mesh axes ``data x fsdp x tensor`` (:class:`mcpm.config.MeshConfig`). The mesh uses classic
GSPMD axis types (``AxisType.Auto``): shardings enter through ``jax.jit``'s in/out shardings and
``with_sharding_constraint``, and XLA's partitioner propagates them through the model, so the
model code itself carries no sharding types. Parameters name their logical axes
(``mcpm.model.minicpm4.LOGICAL_AXES``); :class:`mcpm.config.ShardingRules` maps those to mesh
axes. A dimension that the mesh axes do not divide stays replicated (e.g. 2 kv heads on a
tensor axis of 4), so any mesh runs any model.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mcpm.config import MESH_AXES, MeshConfig, ModelConfig, ShardingRules
from mcpm.model.minicpm4 import LOGICAL_AXES, param_shapes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``data x fsdp x tensor`` mesh over ``devices`` (default: every device of the job)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], rules: ShardingRules,
                 mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the logical names ``axes``.

    Mesh axes of size 1, axes already used by an earlier dimension, and splits that do not
    divide the dimension are dropped, in that order.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = [] if name is None else [a for a in getattr(rules, name)
                                             if mesh.shape[a] > 1 and a not in used]
        while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else
                    mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec)


def param_specs(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules) -> dict[str, PartitionSpec]:
    """PartitionSpec of every parameter by mcpm name."""
    return {name: logical_spec(LOGICAL_AXES[name], shape, rules, mesh)
            for name, shape in param_shapes(cfg).items()}


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules
                    ) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec)
            for name, spec in param_specs(cfg, mesh, rules).items()}


def batch_sharding(mesh: Mesh, rules: ShardingRules, batch_size: int,
                   ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, length, ...]`` array: batch over the rules' batch axes."""
    spec = logical_spec(("batch", "length") + (None,) * (ndim - 2),
                        (batch_size, 1) + (1,) * (ndim - 2), rules, mesh)
    return NamedSharding(mesh, spec)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
        f" ({np.prod(list(mesh.shape.values()))} devices, {jax.process_count()} processes)"


def param_name(path) -> str | None:
    """The mcpm parameter name on a tree path (its last string key), or None."""
    for entry in reversed(path):
        name = getattr(entry, "key", None) or getattr(entry, "name", None)
        if isinstance(name, str) and name != "value":
            return name
    return None


def state_shardings(state_shapes, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules):
    """Shardings for a train state (or any tree) holding parameters and parameter-shaped
    optimizer moments under mcpm names: those follow the parameter's spec, everything else
    (step counters, scalars) is replicated."""
    specs = param_specs(cfg, mesh, rules)
    shapes = param_shapes(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        name = param_name(path)
        if name in specs and tuple(leaf.shape) == tuple(shapes[name]):
            return NamedSharding(mesh, specs[name])
        return replicated
    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def activation_rules(mesh: Mesh, rules: ShardingRules):
    """Context under which the model's activation hints resolve to shardings on ``mesh``."""
    from mcpm.model.sharding_hints import activation_sharding
    return activation_sharding(
        lambda axes, shape: NamedSharding(mesh, logical_spec(axes, shape, rules, mesh)))
