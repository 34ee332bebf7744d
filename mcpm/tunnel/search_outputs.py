"""The outputs of ``mcpm tunnel search`` (see :mod:`mcpm.tunnel.search`): the results table, the
best config, the plots, the printed table and the progress reporter, each rewritten whole after
every finished trial."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from mcpm._files import atomic_write, write_jsonl
from mcpm.config import Config, save_yaml
from mcpm.tunnel.proxy import at_width, with_hparams

TABLE = "results.jsonl"
BEST = "best.yaml"
PLOT_EVERY_S = 30.0  # plots are slow next to a short trial: redraw at most this often
PLOTS = ("search_objective.png", "search_history.png")


def _root(trial) -> int:
    return trial.user_attrs.get("retry_of", trial.number)


def _groups(trials) -> dict:
    """The search's trials: a trial and its retries count once, as the latest attempt."""
    groups = {}
    for t in sorted(trials, key=lambda t: t.number):
        groups[_root(t)] = t
    return groups


def _complete(trials) -> list:
    from optuna.trial import TrialState
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _best(trials):
    done = _complete(trials)
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def _row(t) -> dict:
    from optuna.trial import TrialState
    error = t.user_attrs.get("error")
    if t.state == TrialState.FAIL and error is None:
        error = "its worker stopped (no heartbeat for the grace period)"
    row = {"number": t.number, "state": t.state.name,
           "value": t.value if t.state == TrialState.COMPLETE else None}
    row.update(t.user_attrs.get("settings") or dict(t.params))
    row.update(t.user_attrs.get("metrics") or {})
    row.update(error=error, duration_s=t.user_attrs.get("duration_s"),
               retry_of=t.user_attrs.get("retry_of"),
               start=t.datetime_start.isoformat() if t.datetime_start else None)
    return row


def write_best_yaml(study, cfg: Config, path: str | Path, target_width: int | None = None
                    ) -> Path | None:
    """The config with the best trial's settings (at ``target_width`` under muP when given), as
    YAML for ``mcpm train``; None when no trial has completed."""
    trials = study.get_trials(deepcopy=False) if hasattr(study, "get_trials") else list(study)
    best = _best(trials)
    if best is None:
        return None
    out = with_hparams(cfg, **best.params)
    if target_width:
        out = at_width(out, target_width, "mup")
    path = Path(path)
    atomic_write(path, lambda tmp: save_yaml(out, tmp))
    return path


def write_plots(trials, params, objective: str, workdir: Path) -> list[Path]:
    """``search_objective.png`` and ``search_history.png`` (failed trials: red crosses above
    the highest value)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter
    from optuna.trial import TrialState
    done = _complete(trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    best = _best(trials)
    paths = [workdir / name for name in PLOTS]
    values = [t.value for t in done]
    # failed trials have no value: a row of crosses above the highest one
    top = max(values) + 0.08 * ((max(values) - min(values)) or abs(max(values)) or 1.0) \
        if values else 1.0

    fig = Figure(figsize=(3.6 * len(params), 3.4), layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, name in zip(axes, params):
        if done:
            ax.scatter([t.params[name] for t in done], [t.value for t in done],
                       c=[t.number for t in done], cmap="viridis", s=18, label="trial")
        xs = [t.params[name] for t in failed if name in t.params]
        if xs:
            ax.scatter(xs, [top] * len(xs), marker="x", color="red", label="failed")
        if best is not None:
            ax.scatter([best.params[name]], [best.value], marker="*", s=150, color="orange",
                       edgecolors="black", label="best", zorder=3)
        if name in ("peak_lr", "batch_size"):
            ax.set_xscale("log", base=10 if name == "peak_lr" else 2)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(objective)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{len(done)} complete, {len(failed)} failed", fontsize=9)
    atomic_write(paths[0], lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], s=18, label=objective)
        running, best_so_far = [], math.inf
        for t in done:
            best_so_far = min(best_so_far, t.value)
            running.append(best_so_far)
        ax.step([t.number for t in done], running, where="post", color="orange",
                label="best so far")
    if failed:
        ax.scatter([t.number for t in failed], [top] * len(failed), marker="x", color="red",
                   label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write(paths[1], lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return paths


def format_table(trials, params, n: int = 5) -> str:
    """The ``n`` best complete trials as a text table."""
    done = sorted(_complete(trials), key=lambda t: (t.value, t.number))[:n]
    metrics = ("eval_loss", "train_loss", "indicator_loss")
    shown = [m for m in metrics if any(t.user_attrs.get("metrics", {}).get(m) is not None
                                       for t in done)]
    head = ["trial", "objective", *params, *shown]
    rows = [[str(t.number), f"{t.value:.4f}", *(f"{t.params[p]:.4g}" for p in params),
             *(f"{t.user_attrs['metrics'][m]:.4f}" if t.user_attrs.get("metrics", {}).get(m)
               is not None else "-" for m in shown)] for t in done]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows])


class _Reporter:
    """One line per finished trial, the progress bar, and the outputs."""

    def __init__(self, cfg: Config, limit: int, progress: bool, target_width: int | None):
        self.cfg, self.limit, self.progress = cfg, limit, progress
        self.target_width = target_width
        self.workdir = Path(cfg.tunnel.search.workdir)
        self.seen: set[int] = set()
        self.bar = None
        self.plotted = 0.0
        self.plots: list[Path] = []

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def start(self, study) -> None:
        from tqdm.auto import tqdm
        trials = study.get_trials(deepcopy=False)
        self.seen = {t.number for t in trials if t.state.is_finished()}
        self.bar = tqdm(total=self.limit, initial=self._done(trials), desc="search",
                        unit="trial", disable=not self.progress, dynamic_ncols=True)

    def _done(self, trials) -> int:
        return sum(t.state.is_finished() for t in _groups(trials).values())

    def _line(self, t) -> str:
        from optuna.trial import TrialState
        settings = " ".join(f"{p}={t.params[p]:.4g}" for p in self.cfg.tunnel.search.params
                            if p in t.params)
        retry = f" (retry of {t.user_attrs['retry_of']})" if "retry_of" in t.user_attrs else ""
        took = t.user_attrs.get("duration_s")
        took = f" ({took:.0f} s)" if took is not None else ""
        if t.state == TrialState.COMPLETE:
            return f"trial {t.number}{retry}: {t.value:.4f}  {settings}{took}"
        return f"trial {t.number}{retry}: {t.state.name} {_row(t)['error']}  {settings}{took}"

    def update(self, study, final: bool = False) -> None:
        trials = study.get_trials(deepcopy=False)
        new = [t for t in trials if t.state.is_finished() and t.number not in self.seen]
        for t in new:
            self.seen.add(t.number)
            self.say(self._line(t))
        if self.bar is not None:
            self.bar.n = min(self._done(trials), self.limit)
            self.bar.refresh()
        if new or final:
            self.write(study, trials,
                       plots=final or time.monotonic() - self.plotted >= PLOT_EVERY_S)

    def write(self, study, trials, plots: bool) -> None:
        sc = self.cfg.tunnel.search
        table = self.workdir / TABLE
        write_jsonl(table, [_row(t) for t in trials])
        write_best_yaml(trials, self.cfg, self.workdir / BEST)
        if self.target_width:
            write_best_yaml(trials, self.cfg, self.workdir / f"best-width{self.target_width}.yaml",
                            self.target_width)
        if plots and trials:
            self.plots = write_plots(trials, list(sc.params), sc.objective, self.workdir)
            self.plotted = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
