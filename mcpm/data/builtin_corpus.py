"""Text every machine has: the Python standard library's own sources and docstrings.

Needs no download, so the tiny config, the demo and the tests can train on it offline.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_source_files(limit: int | None = None) -> list[Path]:
    """The ``.py`` files of the running Python's standard library (tests excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idle_test" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files[:limit] if limit else files


VALIDATION_EVERY = 50  # every 50th file (in sorted order, starting with the first) is validation


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_splits(limit: int | None = None) -> dict[str, list[Path]]:
    """``{"train": [...], "validation": [...]}``: every 50th stdlib file (the first included)
    is held out for validation, so both splits are non-empty for any ``limit`` >= 2."""
    files = stdlib_source_files(limit)
    val = files[::VALIDATION_EVERY]
    held = set(val)
    return {"train": [f for f in files if f not in held], "validation": val}
