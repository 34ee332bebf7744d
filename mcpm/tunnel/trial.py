"""One proxy trial: a short constant-lr run of the real trainer plus a branch decay, scored on
held-out data (training spec sections 1-2).

The decayed model is what a WSD run would deliver at that token count, so trials compare
settings the way the final model will be judged, while the stable run they share costs no more
than one run. A trial directory holds an ordinary mcpm run (``WORKDIR``) and its branch
(``WORKDIR/decay_from_STEPS``); rerunning a trial resumes it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from mcpm.config import Config


class TrialDiverged(RuntimeError):
    """The trial's loss or objective is not finite (the lr or init is too large)."""


def trial_configs(cfg: Config, workdir: str | Path, *, steps: int, decay_steps: int
                  ) -> tuple[Config, Config]:
    """(the stable run, its branch decay) of a trial of ``cfg`` in ``workdir``."""
    t = cfg.train
    stable = dataclasses.replace(
        cfg, train=dataclasses.replace(
            t, workdir=str(workdir), steps=steps, decay_from=-1, decay_steps=0,
            checkpoint_every=steps, keep_last=1, keep_every=0, eval_every=0,
            schedule=dataclasses.replace(t.schedule, decay_fraction=0.0)))
    branch = dataclasses.replace(
        stable, train=dataclasses.replace(stable.train, decay_from=steps,
                                          decay_steps=decay_steps))
    return stable, branch


def train_through(cfg: Config, *, progress: bool = False) -> dict:
    """``mcpm.train.loop.train`` for a sweep: a run stopped by Ctrl-C or SIGTERM has saved its
    checkpoint and returned, and so the sweep stops too (KeyboardInterrupt, or the CLI's
    Terminated for SIGTERM) instead of going on to runs that need the unfinished one."""
    from mcpm.train.loop import train

    out = train(cfg, progress=progress)
    if out.get("preempted"):
        if out.get("signal") == "SIGTERM":
            from mcpm.cli import Terminated
            raise Terminated()
        raise KeyboardInterrupt()
    return out


def run_trial(cfg: Config, workdir: str | Path, *, steps: int, decay_steps: int,
              objective: str = "eval_loss", indicator_data: str = "",
              progress: bool = False) -> dict:
    """Train ``cfg`` for ``steps`` steps at constant lr (after its warm-up), decay a branch for
    ``decay_steps`` and score it.

    Returns ``{"objective", "eval_loss", "train_loss", "indicator_loss", "steps", "tokens",
    "run_dir", "branch_dir"}``; ``objective`` is ``eval_loss`` or ``indicator`` (the branch's
    ScalingBench-style loss on ``indicator_data``, ``""``: the shipped set). Raises
    :class:`TrialDiverged` when the run stops on non-finite losses or ends non-finite.
    """
    from mcpm.train.loop import TrainingError

    if objective not in ("eval_loss", "indicator"):
        raise ValueError(f"objective must be 'eval_loss' or 'indicator', got {objective!r}")
    stable, branch = trial_configs(cfg, workdir, steps=steps, decay_steps=decay_steps)
    try:
        train_through(stable, progress=progress)
        out = train_through(branch, progress=progress)
    except TrainingError as e:
        raise TrialDiverged(str(e)) from None
    indicator = None
    if objective == "indicator":
        from mcpm.tunnel.indicator import indicator_loss_of_checkpoint
        indicator = float(indicator_loss_of_checkpoint(out["model"], indicator_data)["loss"])
    result = {"eval_loss": out.get("eval_loss"), "train_loss": out.get("loss"),
              "indicator_loss": indicator, "steps": out["step"],
              "tokens": out["step"] * cfg.data.batch_size * cfg.data.seq_len,
              "run_dir": str(workdir), "branch_dir": out["run_dir"]}
    if objective == "eval_loss" and result["eval_loss"] is None:
        raise ValueError("the trial measured no held-out loss: give data.eval_sources (held-out "
                         "text) or use objective=indicator")
    result["objective"] = result["eval_loss"] if objective == "eval_loss" else indicator
    for key in ("objective", "train_loss"):
        if result[key] is None or not math.isfinite(result[key]):
            raise TrialDiverged(f"the trial's {key} is {result[key]} (not finite)")
    return result
