"""The resume contract: what may differ between a run's saved config and the command that
continues it, and what a changed ``steps`` does to the learning-rate schedule.

A workdir holds one run. Rerunning it resumes from its latest checkpoint only if the new
config differs from the saved ``config.yaml`` in keys that do not change what is being
trained (:data:`RESUMABLE`); any other difference refuses, listing each key with its old and
new value. Starting over is explicit (``--reinit``) and moves the old run aside.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from mcpm.config import Config, ConfigError, UserError, from_dict, to_dict
from mcpm.train.program import schedule_span
from mcpm.train.schedule import decay_start_step, wsd_schedule

CONFIG_FILE = "config.yaml"

# Keys (or whole sections, ending in ".") that a resume may change. They say how long to run,
# how to log and checkpoint, where things are, and how to lay the same computation out on the
# hardware; none changes the state being trained or the batches it sees.
RESUMABLE = (
    "train.workdir",                  # the run was moved
    "train.steps",                    # longer or shorter: see schedule_change()
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
    "train.max_nonfinite_in_a_row", "train.peak_flops_per_device",
    "train.accum_steps",              # same global batch, split into micro-batches
    "train.loss_chunk",               # the same loss, computed a piece at a time
    "mesh.",                          # checkpoints restore onto another mesh (resharded)
    "model.remat", "model.compute_dtype",   # how the model runs, not what it is
    "model.attention_impl", "model.sparse_attention_impl", "model.matmul_precision",
    "data.read_threads", "data.prefetch", "data.cache_dir",
    "train.eval_every", "train.eval_batches", "data.eval_sources",  # measured, not trained
    "generate.", "tunnel.",           # not used by training
)

# A branch decay (``decay_from``) forks a run at a checkpoint: it may also decay on other data
# and with another decay shape. Its own later resumes follow RESUMABLE.
BRANCHABLE = RESUMABLE + (
    "train.decay_from", "train.decay_steps",
    "train.schedule.decay_shape", "train.schedule.half_life_steps",
    "train.schedule.final_fraction", "train.schedule.decay_fraction",
    "data.",
)


class ResumeError(UserError):
    """The workdir holds a run that this config cannot continue; the message says why and
    what to do instead."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists (e.g. ``data.sources``) stay leaves."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def may_change(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _complete(data: dict, source: str) -> dict:
    """A saved config as a plain dict with every key filled in (an older run's may lack keys
    added since), so that it compares key by key with a new one."""
    try:
        return to_dict(from_dict(Config, data))
    except ConfigError as e:
        raise ResumeError(f"{source}: cannot read the run's saved config ({e}); it is needed to "
                          "check that this command continues the same run. Fix it, or start "
                          "over with --reinit (the old run is moved aside)") from None


def saved_run_config(run_dir: Path, ckpts) -> dict | None:
    """The config of the run in ``run_dir``: its ``config.yaml``, else the config saved with
    its newest readable checkpoint (``ckpts``, its :class:`RunCheckpoints`); None when neither
    exists."""
    path = Path(run_dir) / CONFIG_FILE
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ResumeError(f"{path}: cannot read the run's saved config ({e}); fix the file, "
                              "or start over with --reinit (the old run is moved aside)") from None
        return _complete(data, str(path))
    data = ckpts.saved_config()
    return None if data is None else _complete(data, f"the checkpoints in {ckpts.directory}")


def holds_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists and holds anything."""
    return Path(run_dir).is_dir() and any(Path(run_dir).iterdir())


def differences(old: dict, new: dict, allowed: tuple[str, ...] = ()) -> list[tuple[str, object,
                                                                              object]]:
    """(key, old, new) for every key whose value differs and is not in ``allowed``."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys
            if a.get(k) != b.get(k) and not may_change(k, allowed)]


def check_same_run(saved: dict, cfg: Config, run_dir: Path, *, branch_of: Path | None = None
                   ) -> list[str]:
    """Refuse (ResumeError) when ``cfg`` changes a key that a resume (or, with ``branch_of``,
    a branch decay) may not change. Returns the allowed changes as ``key: old -> new`` lines."""
    new = to_dict(cfg)
    allowed = BRANCHABLE if branch_of is not None else RESUMABLE
    refused = differences(saved, new, allowed)
    may = "a branch decay" if branch_of is not None else "a resume"
    if refused:
        lines = "\n".join(f"  {k}: {_show(o)} -> {_show(n)}" for k, o, n in refused)
        what = (f"branch from the run in {branch_of}" if branch_of is not None
                else f"continue the run in {run_dir}")
        raise ResumeError(
            f"this config cannot {what}; it differs from that run's {CONFIG_FILE} in:\n{lines}\n"
            f"Either give the new run its own workdir (workdir=...), or start over in this one "
            f"with --reinit (the old run is moved aside, not deleted). Keys that {may} may "
            f"change: {', '.join(a + '*' if a.endswith('.') else a for a in allowed)}.")
    return [f"{k}: {_show(o)} -> {_show(n)}" for k, o, n in differences(saved, new)]


def schedule_change(saved: dict, cfg: Config, step: int) -> tuple[str | None, bool]:
    """(one line describing how the lr schedule changes at the resume ``step``, or None; whether
    the change makes the lr jump there and so needs the user's confirmation)."""
    old_cfg = from_dict(Config, saved)
    (old_total, old_start), (new_total, new_start) = schedule_span(old_cfg), schedule_span(cfg)
    if (old_total, old_start) == (new_total, new_start):
        return None, False
    old_sched, new_sched = old_cfg.train.schedule, cfg.train.schedule
    old_lr = float(wsd_schedule(old_sched, old_total, old_start)(step))
    new_lr = float(wsd_schedule(new_sched, new_total, new_start)(step))
    old_decay = decay_start_step(old_total, old_sched) if old_start is None else old_start
    new_decay = decay_start_step(new_total, new_sched) if new_start is None else new_start
    moved = (f"the decay starts at step {new_decay} (was {old_decay}) and ends at "
             f"{new_total} (was {old_total})")
    if abs(new_lr - old_lr) <= 1e-6 * max(abs(old_lr), abs(new_lr), 1e-30):
        return f"schedule: {moved}; the lr at step {step} stays {old_lr:.3g}", False
    rewarm = step >= old_decay and step < new_decay and new_lr > old_lr
    return (f"schedule: at step {step} the lr jumps from {old_lr:.3g} to {new_lr:.3g}"
            + (" (back to the stable phase: a re-warm-up)" if rewarm else "")
            + f"; {moved}"), True


def move_aside(run_dir: Path) -> Path:
    """Rename a run directory to ``NAME.reinit-YYYYmmdd-HHMMSS`` beside it (never deleted)."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.reinit-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.reinit-{stamp}-{n}")
    run_dir.rename(target)
    return target
