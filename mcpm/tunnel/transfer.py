"""``mcpm tunnel transfer``: does the best learning rate stay put as the model widens?

For each parametrisation (muP, and standard parametrisation as defined in
:mod:`mcpm.tunnel.proxy`), each width and each lr, one WSD run of ``steps`` steps (the config's
schedule shape) is trained and scored by its held-out loss. Under muP the loss-against-lr curves
of all widths share their minimum (the lr found on a small proxy is the lr of the large
model); under SP the optimum moves to smaller lrs as width grows. Every point is an ordinary
mcpm run in ``WORKDIR/PARAM/wWIDTH/lrLR``, so a killed sweep resumes and a finished point is
never trained again.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from mcpm._files import atomic_write, write_jsonl
from mcpm.config import Config
from mcpm.tunnel.proxy import at_width, with_hparams

TABLE = "transfer.jsonl"


def point_config(cfg: Config, parametrization: str, width: int, lr: float) -> Config:
    tr = cfg.tunnel.transfer
    c = with_hparams(at_width(cfg, width, parametrization), peak_lr=lr)
    return dataclasses.replace(c, train=dataclasses.replace(
        c.train, workdir=str(Path(tr.workdir) / parametrization / f"w{width}" / f"lr{lr:g}"),
        steps=tr.steps, decay_from=-1, decay_steps=0, eval_every=0,
        checkpoint_every=tr.steps, keep_last=1))


def run_transfer(cfg: Config, *, progress: bool = False, say=print) -> tuple[Path, Path]:
    """Train every (parametrisation, width, lr) point; returns (the table, the plot)."""
    from tqdm import tqdm

    from mcpm.train.loop import TrainingError
    from mcpm.tunnel.trial import train_through as train

    tr = cfg.tunnel.transfer
    workdir = Path(tr.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    points = [(p, w, lr) for p in tr.parametrizations for w in tr.widths for lr in tr.lrs]
    rows = []
    bar = tqdm(points, desc="transfer", unit="run", disable=not progress, dynamic_ncols=True)
    trained = {}  # at the base width SP is muP: the same run, trained once
    for p, w, lr in bar:
        c = point_config(cfg, p, w, lr)
        row = {"parametrization": p, "width": w, "lr": lr, "n_params": c.model.num_params()}
        same = dataclasses.replace(c, train=dataclasses.replace(c.train, workdir=""))
        if same in trained:
            row.update({k: v for k, v in trained[same].items() if k not in row}, same_as=
                       trained[same]["parametrization"])
            rows.append(row)
            write_jsonl(workdir / TABLE, rows)
            continue
        try:
            out = train(c, progress=False)
            loss = out.get("eval_loss")
            row.update(loss=loss if loss is not None and math.isfinite(loss) else None,
                       train_loss=out.get("loss"), status="ok" if loss is not None else "nan")
        except TrainingError as e:
            row.update(loss=None, status="diverged", error=str(e).splitlines()[0])
        rows.append(row)
        trained[same] = row
        write_jsonl(workdir / TABLE, rows)
        bar.set_postfix(p=p, w=w, lr=f"{lr:g}",
                        loss="diverged" if row["loss"] is None else f"{row['loss']:.3f}")
    bar.close()
    png = plot_transfer(rows, workdir / "transfer.png")
    for p in tr.parametrizations:
        best = {w: best_lr(rows, p, w) for w in tr.widths}
        say(f"mcpm tunnel transfer: {p}: best lr per width " +
            ", ".join(f"{w}: {lr:g}" if lr else f"{w}: n/a" for w, lr in best.items()))
    return workdir / TABLE, png


def best_lr(rows: list[dict], parametrization: str, width: int) -> float | None:
    pts = [(r["loss"], r["lr"]) for r in rows if r["parametrization"] == parametrization
           and r["width"] == width and r["loss"] is not None]
    return min(pts)[1] if pts else None


def plot_transfer(rows: list[dict], out_png: Path) -> Path:
    """Held-out loss against lr, one line per width, one panel per parametrisation; each
    width's best lr is marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["parametrization"] for r in rows}, key=["mup", "sp"].index)
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.2), sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, p in zip(axes[0], params):
        for i, w in enumerate(widths):
            pts = sorted((r["lr"], r["loss"]) for r in rows
                         if r["parametrization"] == p and r["width"] == w
                         and r["loss"] is not None)
            if not pts:
                continue
            color = cmap(i / max(len(widths) - 1, 1))
            ax.plot(*zip(*pts), "o-", color=color, label=f"width {w}")
            lr, loss = min(pts, key=lambda t: t[1])
            ax.plot([lr], [loss], "*", ms=14, color=color, mec="black")
        ax.set_xscale("log")
        lrs = sorted({r["lr"] for r in rows})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate")
        ax.set_title({"mup": "muP", "sp": "standard parametrisation"}[p])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    fig.suptitle("lr transfer across width (stars: each width's best lr)")
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out_png


def transfer_command(args) -> int:
    from mcpm.tunnel.cli import load_section_config

    cfg = load_section_config("transfer", args)
    table, png = run_transfer(cfg, progress=True)
    print(f"mcpm tunnel transfer: {table}; plot {png}")
    return 0
