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
