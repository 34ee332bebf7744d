"""Ahead-of-time compilation of the sharded train step for a TPU slice, without a TPU.

libtpu describes TPU slices (``jax.experimental.topologies.get_topology_desc``); the train step
is lowered and compiled for those devices here, and the compiled executable's memory analysis
gives each device's HBM use (arguments, outputs, temporaries) to compare with the chip's HBM.
Slice names: the Cloud TPU ones (``v5p-64``, ``v5e-256``, ``v4-32``, ``v6e-16``; v4/v5p count
TensorCores, two per chip; v5e/v6e count chips) or libtpu's own (``v5p:4x4x2``).
"""
from __future__ import annotations

import dataclasses
import os
import re

from mcpm.config import Config, ConfigError
from mcpm.sharding import make_mesh
from mcpm.train.program import build_train_program

GIB = 1024 ** 3
# libtpu's name, cores per chip in the Cloud name, HBM per chip
CHIPS = {"v4": ("v4", 2, 32 * GIB), "v5p": ("v5p", 2, 95 * GIB), "v5e": ("v5e", 1, 16 * GIB),
         "v5litepod": ("v5e", 1, 16 * GIB), "v6e": ("v6e", 1, 32 * GIB)}
SHAPES_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
             64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
             2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}


def libtpu_topology_name(name: str) -> tuple[str, int]:
    """(libtpu topology name, HBM bytes per chip) for a Cloud or libtpu slice name."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m:
        kind, cores_per_chip, hbm = CHIPS[m.group(1)]
        count = int(m.group(2))
        chips = count // cores_per_chip
        shapes = SHAPES_3D if kind in ("v4", "v5p") else SHAPES_2D
        if count % cores_per_chip or chips not in shapes:
            raise ConfigError(f"unknown slice {name!r}: {kind} slices have "
                              f"{sorted(c * cores_per_chip for c in shapes)} "
                              f"{'TensorCores' if cores_per_chip == 2 else 'chips'}")
        return f"{kind}:{shapes[chips]}", hbm
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):[0-9x]+", name)
    if m:
        return name, CHIPS[m.group(1)][2]
    raise ConfigError(f"unknown TPU slice {name!r}: use a Cloud name such as v5p-64, v5e-256, "
                      "v4-32, v6e-16, or libtpu's such as v5p:4x4x2")


def topology_devices(name: str):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    libtpu_name, hbm = libtpu_topology_name(name)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown to it
        raise RuntimeError(f"libtpu could not describe TPU slice {libtpu_name!r} ({e}); AOT "
                           "compilation needs `pip install libtpu` (the [test] extra has it)"
                           ) from e
    return topo.devices, libtpu_name, hbm


def compile_train_step(cfg: Config, topology: str, batch_size: int, seq_len: int) -> dict:
    """Compile the sharded train step of ``cfg`` for ``topology``; per-device memory report."""
    devices, libtpu_name, hbm = topology_devices(topology)
    program = build_train_program(cfg, make_mesh(cfg.mesh, devices), batch_size=batch_size)
    mesh = program.mesh
    report = {"topology": topology, "libtpu_topology": libtpu_name, "devices": len(devices),
              "device_kind": devices[0].device_kind,
              "mesh": dict(mesh.shape), "batch_size": batch_size, "seq_len": seq_len,
              "hbm_bytes": hbm}
    lowered = program.step.trace(program.abstract_state,
                                 program.batch_spec(batch_size, seq_len)).lower()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA refuses programs that cannot fit
        m = re.search(r"required for HLO temporaries \(([\d.]+)([TGMK])\) exceeds available "
                      r"HBM \(([\d.]+)([TGMK])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        unit = {"T": 1024 * GIB, "G": GIB, "M": 1024 ** 2, "K": 1024}
        report.update(argument_bytes=None, output_bytes=None, alias_bytes=None,
                      temp_bytes=int(float(m.group(1)) * unit[m.group(2)]),
                      generated_code_bytes=None, fits=False,
                      total_bytes=int(float(m.group(1)) * unit[m.group(2)]),
                      error=str(e).splitlines()[0][:300])
        return report
    mem = compiled.memory_analysis()
    report.update(argument_bytes=mem.argument_size_in_bytes,
                  output_bytes=mem.output_size_in_bytes,
                  alias_bytes=mem.alias_size_in_bytes,
                  temp_bytes=mem.temp_size_in_bytes,
                  generated_code_bytes=mem.generated_code_size_in_bytes)
    # donated state aliases its outputs: count those bytes once
    report["total_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                             - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    report["fits"] = report["total_bytes"] <= hbm
    return report


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"{r['topology']} ({r['libtpu_topology']}, {r['devices']} x {r['device_kind']}), "
             f"mesh {mesh}, global batch {r['batch_size']} x {r['seq_len']} tokens"]
    if r.get("error"):
        return "\n".join(lines + [f"  XLA refused it: temporaries alone need {g(r['temp_bytes'])}"
                                  f" per device, {g(r['hbm_bytes'])} HBM", "  DOES NOT FIT"])
    lines += [f"  per device: arguments {g(r['argument_bytes'])}",
              f"              outputs   {g(r['output_bytes'])} (aliased with donated "
              f"arguments: {g(r['alias_bytes'])})",
              f"              temporary {g(r['temp_bytes'])}",
              f"              total     {g(r['total_bytes'])} of {g(r['hbm_bytes'])} HBM "
              f"({100 * r['total_bytes'] / r['hbm_bytes']:.0f}%)",
              "  fits" if r["fits"] else "  DOES NOT FIT"]
    return "\n".join(lines)


def with_mesh(cfg: Config, **sizes) -> Config:
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **sizes))
