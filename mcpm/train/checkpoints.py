"""Run checkpoints: an orbax CheckpointManager (asynchronous; keep the last N plus every K-th)
holding the train state and the resolved config, plus each process's data-iterator state.

Layout under ``workdir/checkpoints``: ``STEP/`` (orbax: ``state``, ``config``) and
``data/STEP/process_I.json`` (written atomically before the orbax save starts, so a finalized
orbax step always has its data states). Restoring takes the latest step that restores cleanly;
a corrupt one is skipped with a warning. Shardings of the restore target decide the placement,
so a run resumes on another mesh or device count.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def _encode(obj):
    """JSON-safe copy of a data-iterator state (bytes become {"__bytes__": base64})."""
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep_last: int = 3, keep_every: int = 0,
                 asynchronous: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None,
            enable_async_checkpointing=asynchronous, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _data_path(self, step: int, process: int | None = None) -> Path:
        process = jax.process_index() if process is None else process
        return self.directory / "data" / str(step) / f"process_{process}.json"

    def save(self, step: int, state, config: dict, data_state=None) -> None:
        """Start saving (asynchronously); the data state is written first, synchronously."""
        if data_state is not None:
            path = self._data_path(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(_encode(data_state)))
            os.replace(tmp, path)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=True)
        self._drop_stale_data_states()

    def _drop_stale_data_states(self) -> None:
        root = self.directory / "data"
        if jax.process_index() != 0 or not root.is_dir():
            return
        keep = set(self.steps())
        for d in root.iterdir():
            if d.name.isdigit() and int(d.name) not in keep and \
                    int(d.name) < max(keep | {int(d.name)}):
                shutil.rmtree(d, ignore_errors=True)

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, config dict, data state or None) of ``step`` or of the latest step
        that restores cleanly; None when there is no checkpoint. ``abstract_state``: a tree of
        ``jax.ShapeDtypeStruct`` with the target shardings."""
        candidates = [step] if step is not None else self.steps()[::-1]
        if step is not None and step not in self.steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} "
                                    f"(have: {self.steps() or 'none'})")
        for s in candidates:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    config=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any damage means: use the one before
                if step is not None:
                    raise
                warnings.warn(f"checkpoint {self.directory / str(s)} could not be restored "
                              f"({type(e).__name__}: {str(e)[:200]}); falling back to an "
                              "earlier one", stacklevel=2)
                continue
            path = self._data_path(s)
            data_state = _decode(json.loads(path.read_text())) if path.exists() else None
            return s, out["state"], dict(out["config"]), data_state
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
