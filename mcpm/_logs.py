"""Quiet orbax's routine log lines, so that the lines that matter stay visible.

Each save logs "Skipping merge of OCDBT checkpoints" and "ArrayMetadata persistence is disabled"
through absl (informational, on every save). An aborted restore leaves dozens of tracebacks
behind after its error has been raised to the caller: "Event loop is closed" from callbacks in
worker threads, "Task exception was never retrieved" for its read tasks, and "Exception ignored
in: <coroutine ...>" when its unfinished read coroutines are collected. Only those are dropped;
every other warning, error and unraisable exception passes.
"""
from __future__ import annotations

import logging
import sys
import threading
import types

_ROUTINE = ("Skipping merge of OCDBT checkpoints",
            "ArrayMetadata persistence is disabled")


def _teardown_noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


class _OrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _teardown_noise(record.exc_info[1]):
            return False
        msg = record.getMessage()
        if any(text in msg for text in _ROUTINE):
            return False
        return not ("Task exception was never retrieved" in msg and "orbax" in msg)


_FILTER = _OrbaxNoise()


def _orbax_coroutine(obj) -> bool:
    return isinstance(obj, types.CoroutineType) and "orbax" in obj.cr_code.co_filename


def quiet_orbax() -> None:
    """Install the filters (idempotent). They stay: the records arrive after the restore has
    returned, when its threads finish and its coroutines are collected."""
    for name in ("absl", "asyncio", "concurrent.futures"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not getattr(sys.unraisablehook, "_mcpm_quiet", False):
        previous_unraisable = sys.unraisablehook

        def unraisable(u):
            if _orbax_coroutine(u.object) or _teardown_noise(u.exc_value):
                return
            previous_unraisable(u)
        unraisable._mcpm_quiet = True
        sys.unraisablehook = unraisable
    if not getattr(threading.excepthook, "_mcpm_quiet", False):
        previous_thread = threading.excepthook

        def thread(args):
            if _teardown_noise(args.exc_value):
                return
            previous_thread(args)
        thread._mcpm_quiet = True
        threading.excepthook = thread
