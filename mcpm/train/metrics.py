"""Run metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step), TensorBoard event
files (tensorboardX) and the loss/lr plot written at the end of a run."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsWriter:
    """Appends ``{"step": ..., **metrics}`` lines and TensorBoard scalars (process 0 only).

    ``resume_step``: the step the run (re)starts from. Rows and events logged after it by an
    earlier attempt describe steps that are about to be run again, so they are dropped: the
    jsonl keeps one row per step, and TensorBoard purges the events from that step on.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_rows_after(resume_step)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                         purge_step=resume_step + 1)

    def _drop_rows_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn line of a killed run
        if len(keep) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value) if not isinstance(value, (str, bool)) else value
            row[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = (f"eval/{key[5:]}" if key.startswith("eval_") else
                           f"quant/{key[6:]}" if key.startswith("quant_") else f"train/{key}")
                    self._tb.add_scalar(tag, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Training loss (log scale; the held-out ``eval_loss`` too, where measured) and learning
    rate against the step, from a metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(path) if r.get("loss") is not None]
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    avg = [(r["step"], r["loss_avg"]) for r in rows if r.get("loss_avg") is not None]
    # log_every = 1: the mean is the step's loss, one line is enough
    if any(r.get("loss_avg") not in (None, r["loss"]) for r in rows):
        ax_loss.plot(steps, [r["loss"] for r in rows], lw=0.8, alpha=0.4,
                     label="loss of the logged step")
        ax_loss.plot(*zip(*avg), lw=1.6, color="tab:blue", label="mean since the previous log")
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.plot(steps, [r["loss"] for r in rows], lw=1.2, label="train loss")
    held = [(r["step"], r["eval_loss"]) for r in read_metrics(path)
            if r.get("eval_loss") is not None]
    if held:
        ax_loss.plot(*zip(*held), "o-", lw=1.6, ms=4, color="tab:green",
                     label="held-out loss (eval_loss)")
        ax_loss.legend(fontsize=8)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3, which="both")
    if title:
        ax_loss.set_title(title)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:orange", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
