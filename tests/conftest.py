"""Shared test fixtures: where the official reference checkpoints live, small configs."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# CPU tests: with libtpu installed (the test extra, for TPU AOT compiles) JAX would otherwise try
# to start a TPU runtime first
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache per test session (subprocess tests share it): the many
# tests that compile the same small programs again (train runs, resumes) compile them once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mcpm-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MCPM_SHARED", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official-minicpm4"
OFFICIAL_CASES = ["tied_longrope_ext", "untied_longrope"]


@pytest.fixture(params=OFFICIAL_CASES)
def official_case(request) -> Path:
    """A folder with hf/, ids.npy, logits.npy, greedy.npy made by the official PyTorch code."""
    path = OFFICIAL / request.param
    if not path.is_dir():
        pytest.skip(f"official fixtures not found at {path} (set MCPM_SHARED)")
    return path
