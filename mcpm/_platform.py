"""Keep JAX from probing for a TPU on a machine that has libtpu installed but no TPU.

libtpu (in the [test] extra, for the TPU AOT-compile tests) makes JAX try a TPU runtime first,
which prints errors on a CPU-only machine. If JAX_PLATFORMS is unset and no TPU or GPU device
node exists, default it to "cpu". Must run before JAX initialises a backend.
"""
from __future__ import annotations

import glob
import importlib.util
import os


def default_to_cpu_without_accelerators() -> None:
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
