"""Run checkpoints: an orbax CheckpointManager (asynchronous; keep the last N plus every K-th)
holding the train state and the resolved config, plus each process's data-iterator state.

Layout under ``workdir/checkpoints``: ``STEP/`` (orbax: ``state`` with one directory per array,
``config``) and ``data/STEP/process_I.json`` (written atomically before the orbax save starts,
so a finalized orbax step always has its data states).

Restoring takes the latest step that restores cleanly. Only damage counts as a reason to fall
back: a checkpoint whose arrays do not match the state being restored (another model or
optimizer) refuses with the differing tensor, and a missing data state refuses unless the data
may restart. A damaged step newer than the one restored is moved to ``workdir/quarantine/`` (never
deleted), so that the run can save that step again. Old steps are removed by orbax only after a
newer save has been committed, so the newest restorable checkpoint is never the one deleted.
Shardings of the restore target decide the placement: a run resumes on another mesh.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mcpm._logs import quiet_orbax
from mcpm.config import UserError

QUARANTINE = "quarantine"


class CheckpointMismatchError(UserError):
    """A checkpoint holds another model or optimizer than the one being restored."""


class MissingDataStateError(UserError):
    """A checkpoint has no data-iterator state for this process."""


class NoRestorableCheckpointError(UserError):
    """Every checkpoint of a run is damaged."""


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


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {_path_name(p): (tuple(leaf.shape), str(leaf.dtype))
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class RunCheckpoints:
    """The checkpoints of one run directory. ``create=False`` opens an existing directory (or
    none) without creating anything, for checks made before a run is allowed to start."""

    def __init__(self, workdir: str | Path, keep_last: int = 3, keep_every: int = 0,
                 asynchronous: bool = True, create: bool = True):
        self.workdir = Path(workdir).resolve()
        self.directory = self.workdir / "checkpoints"
        self.damaged: list[tuple[int, str]] = []   # (step, why) skipped by the last restore
        quiet_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None,
            enable_async_checkpointing=asynchronous, create=create)
        # one file tree per array (no OCDBT): a damaged file names the array it belongs to
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                           "config": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(self.manager.all_steps())

    def _data_path(self, step: int, process: int | None = None) -> Path:
        process = jax.process_index() if process is None else process
        return self.directory / "data" / str(step) / f"process_{process}.json"

    # -- saving ------------------------------------------------------------------------------

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
        """Data states of steps orbax has removed (only older than the newest step)."""
        root = self.directory / "data"
        if jax.process_index() != 0 or not root.is_dir():
            return
        keep = set(self.steps())
        for d in root.iterdir():
            if d.name.isdigit() and int(d.name) not in keep and \
                    int(d.name) < max(keep | {int(d.name)}):
                shutil.rmtree(d, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------

    def saved_config(self) -> dict | None:
        """The config saved with the newest checkpoint whose config reads (a run directory
        that lacks its config.yaml still knows what it trained)."""
        for s in reversed(self.steps()):
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))
                return dict(out["config"])
            except Exception:  # noqa: BLE001 - damaged: try the one before
                continue
        return None

    def _check_structure(self, step: int, abstract_state) -> None:
        """CheckpointMismatchError when the stored arrays are not the ones of ``abstract_state``
        (names, shapes, dtypes); OSError-like failures propagate as damage."""
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            raise ValueError("no array metadata")
        have, want = _leaf_specs(stored), _leaf_specs(abstract_state)
        if have == want:
            return
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        changed = [(k, have[k], want[k]) for k in sorted(set(have) & set(want))
                   if have[k] != want[k]]
        parts = []
        if changed:
            parts.append("; ".join(f"{k}: stored {h[0]} {h[1]}, expected {w[0]} {w[1]}"
                                   for k, h, w in changed[:5])
                         + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""))
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        raise CheckpointMismatchError(
            f"checkpoint {self.directory / str(step)} holds another model or optimizer state "
            f"than this config builds: {'; '.join(parts)}. Restore it with the config it was "
            "written with (its run's config.yaml), or train this config in another workdir.")

    def _read_data_state(self, step: int, allow_missing: bool):
        path = self._data_path(step)
        if not path.exists():
            if not allow_missing:
                raise MissingDataStateError(
                    f"checkpoint {self.directory / str(step)} has no data-iterator state for "
                    f"process {jax.process_index()} ({path} is missing): resuming would replay "
                    "the data from its start. Pass --restart-data (restart_data=True) to resume "
                    "the weights and optimizer with the data pipeline started afresh.")
            warnings.warn(f"{path} is missing: the data pipeline restarts from its beginning "
                          "(--restart-data), so the first batches are seen again", stacklevel=3)
            return None
        return _decode(json.loads(path.read_text()))

    def _restore_one(self, step: int, abstract_state, allow_missing_data: bool):
        self._check_structure(step, abstract_state)
        data_state = self._read_data_state(step, allow_missing_data)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["config"]), data_state

    def restore(self, abstract_state, step: int | None = None, *,
                allow_missing_data_state: bool = False):
        """(step, state, config dict, data state or None) of ``step`` or of the latest step
        that restores cleanly; None when there is no checkpoint. ``abstract_state``: a tree of
        ``jax.ShapeDtypeStruct`` with the target shardings.

        Damaged steps newer than the restored one are skipped and remembered in ``damaged``
        (:meth:`quarantine_damaged` moves them aside); if every step is damaged,
        NoRestorableCheckpointError lists why each failed. Nothing on disk changes here."""
        have = self.steps()
        if step is not None and step not in have:
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} "
                                    f"(have: {have or 'none'})")
        damaged = []
        for s in [step] if step is not None else reversed(have):
            try:
                restored = self._restore_one(s, abstract_state, allow_missing_data_state)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - damaged files raise many types
                damaged.append((s, _brief(e)))
                continue
            self.damaged = damaged
            return restored
        if damaged:
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} can be restored:\n" + "\n".join(
                    f"  step {s}: {why}" for s, why in damaged)
                + "\nNothing was changed. Repair or remove the damaged steps, or start over "
                  "with --reinit (the old run is moved aside).")
        return None

    def quarantine_damaged(self) -> list[str]:
        """Move the damaged steps the last :meth:`restore` skipped to the quarantine (called
        once the run is sure to go on); returns one line per step saying where it went."""
        lines = []
        for bad, why in self.damaged:
            lines.append(f"checkpoint step {bad} could not be restored ({why}); moved it to "
                         f"{self.quarantine(bad)}")
        self.damaged = []
        return lines

    def quarantine(self, step: int) -> Path:
        """Move step ``step`` (orbax directory and data states) to
        ``workdir/quarantine/step_STEP-TIME/``; returns that directory."""
        target = self.workdir / QUARANTINE / f"step_{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.mkdir(parents=True, exist_ok=False)
            (self.directory / str(step)).rename(target / "checkpoint")
            data = self.directory / "data" / str(step)
            if data.is_dir():
                data.rename(target / "data")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"mcpm-quarantine-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _brief(e: Exception) -> str:
    # tensorstore appends its whole spec to read errors; the array index before it is enough
    text = " ".join(str(e).split(" See full TensorStore details")[0].split())
    return f"{type(e).__name__}: {text[:240]}" + ("..." if len(text) > 240 else "")
