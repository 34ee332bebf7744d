"""``mcpm tunnel scale``: the (N, D, loss) table of a scaling-law fit from one constant-lr run
per width and short branch decays (training spec sections 1-2).

Per width the main run trains at constant lr (after the warm-up) up to each fork step in turn;
at each fork step a branch decays for ``decay_ratio`` of it into ``decay_from_STEP/``, and its
held-out loss is the loss "at D tokens" (D counts the branch's last step). m widths and k fork
points cost m runs plus m x k short decays instead of m x k full runs.

Everything is an ordinary mcpm run, so a killed command resumes where it stopped, and adding a
width or a fork step later trains only what is new. A fork step must be a checkpoint of the
main run: the main run keeps one every gcd(fork steps) steps, so a new fork step that is not
a multiple of the old gcd needs a main run that has not passed it yet.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from mcpm._files import write_jsonl
from mcpm.config import Config, UserError
from mcpm.tunnel.proxy import at_width, non_embedding_params

TABLE = "scaling.jsonl"


class ScaleError(UserError):
    """A scaling sweep cannot go on as asked (the message says why and what to do)."""


def branch_steps(fork: int, ratio: float) -> int:
    return max(1, int(round(ratio * fork)))


def width_configs(cfg: Config, width: int, fork: int, gcd: int, workdir: Path
                  ) -> tuple[Config, Config]:
    """(the main run trained up to ``fork``, the branch decaying from ``fork``) at ``width``."""
    sc = cfg.tunnel.scale
    base = at_width(cfg, width, "mup")
    t = base.train
    main = dataclasses.replace(base, train=dataclasses.replace(
        t, workdir=str(workdir / f"w{width}"), steps=fork, decay_from=-1, decay_steps=0,
        checkpoint_every=gcd, keep_every=gcd, eval_every=0,
        schedule=dataclasses.replace(t.schedule, decay_fraction=0.0)))
    branch = dataclasses.replace(main, train=dataclasses.replace(
        main.train, decay_from=fork, decay_steps=branch_steps(fork, sc.decay_ratio)))
    return main, branch


def run_scale(cfg: Config, *, progress: bool = True, say=print) -> Path:
    """Train every width's main run and branches (resuming what exists); returns the table."""
    from mcpm.train.loop import TrainingError
    from mcpm.tunnel.trial import train_through as train

    sc = cfg.tunnel.scale
    workdir = Path(sc.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    forks = sorted(set(sc.decays))
    gcd = math.gcd(*forks)
    warmup = cfg.train.schedule.warmup_steps
    if forks[0] < warmup:
        raise ScaleError(f"tunnel.scale.decays: the first fork step {forks[0]} is inside the "
                         f"{warmup}-step warm-up (train.schedule.warmup_steps); branch from "
                         "the constant-lr phase")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    table = workdir / TABLE
    rows = {}
    if table.is_file():
        for line in table.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["width"], r["decay_from"])] = r
    total = len(sc.widths) * len(forks)
    done = 0
    for width in sc.widths:
        for fork in forks:
            main, branch = width_configs(cfg, width, fork, gcd, workdir)
            key = (width, fork)
            done += 1
            old = rows.get(key, {})
            if old and old.get("decay_steps") != branch.train.decay_steps:
                raise ScaleError(
                    f"{table}: the branch of width {width} from step {fork} decayed for "
                    f"{old.get('decay_steps')} steps, this sweep asks for "
                    f"{branch.train.decay_steps} (tunnel.scale.decay_ratio changed); a sweep "
                    "keeps one decay ratio: give this one its own tunnel.scale.workdir")
            if old.get("status") == "ok":
                continue
            n = non_embedding_params(main)
            row = {"width": width, "n_params": n, "n_params_total": main.model.num_params(),
                   "decay_from": fork, "decay_steps": branch.train.decay_steps,
                   "steps": fork + branch.train.decay_steps,
                   "n_tokens": (fork + branch.train.decay_steps) * tokens_per_step,
                   "run_dir": str(Path(main.train.workdir) / f"decay_from_{fork}")}
            try:
                _train_main_to(main, fork, train, progress)
                out = train(branch, progress=progress)
            except TrainingError as e:
                row.update(status="diverged", loss=None, error=str(e))
            else:
                row.update(status="ok", loss=out.get("eval_loss"), train_loss=out.get("loss"))
                if row["loss"] is None:
                    raise ScaleError("the branch measured no held-out loss: the sweep needs "
                                     "data.eval_sources (held-out text)")
            rows[key] = row
            write_jsonl(table, [rows[k] for k in sorted(rows)])
            loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
            say(f"mcpm tunnel scale: [{done}/{total}] width {width} (N={n:,}), "
                f"D={row['n_tokens']:,} tokens: held-out loss {loss}")
    return table


def _train_main_to(main: Config, fork: int, train, progress: bool) -> None:
    """The main run at ``fork`` steps (trained on, or found there), with a checkpoint there."""
    from mcpm.train.checkpoints import RunCheckpoints

    run = Path(main.train.workdir)
    if run.exists():
        ckpts = RunCheckpoints(run, main.train.keep_last, main.train.keep_every, create=False)
        try:
            steps = ckpts.steps()
        finally:
            ckpts.close()
        if fork in steps:
            return
        if steps and max(steps) > fork:
            raise ScaleError(
                f"fork step {fork}: the main run {run} is already at step {max(steps)} and kept "
                f"no checkpoint at {fork} (it has {steps}); choose fork steps among those, or "
                "a workdir of its own for this sweep")
    train(main, progress=progress)


def scale_command(args) -> int:
    from mcpm.tunnel.cli import load_section_config

    cfg = load_section_config("scale", args)
    table = run_scale(cfg)
    print(f"mcpm tunnel scale: the table is {table}; fit it with: mcpm tunnel fit {table}")
    return 0
