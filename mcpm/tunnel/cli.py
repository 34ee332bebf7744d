"""``mcpm tunnel ...``: the ModelTunnel v2 commands. Arguments are declared here; each command's
work lives in its module (imported when the command runs, so ``mcpm --help`` stays fast)."""
from __future__ import annotations

import argparse
import importlib

# bare keys accepted by `mcpm tunnel scale` / `search` / `transfer` for their own section
SECTION_ALIASES = {"scale": ("widths", "decays", "decay_ratio", "workdir"),
                   "search": ("trials", "sampler", "storage", "study", "objective", "parallel",
                              "workdir", "params", "steps", "decay_steps"),
                   "transfer": ("widths", "lrs", "parametrizations", "steps", "workdir")}


def section_overrides(action: str, items: list[str]) -> list[str]:
    """``widths=[64,128]`` -> ``tunnel.scale.widths=[64,128]`` for the command's own keys."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        out.append(f"tunnel.{action}.{item}" if key in SECTION_ALIASES.get(action, ()) else item)
    return out


def _run(module: str, function: str):
    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"mcpm.tunnel.{module}"), function)(args)
    return call


def register(sub) -> None:
    """Add ``tunnel`` and its actions to the top-level subparsers ``sub``."""
    t = sub.add_parser("tunnel", help="ModelTunnel v2: muP proxy searches, lr transfer, the "
                                      "indicator, scaling-law fits")
    tsub = t.add_subparsers(dest="action", required=True)

    s = tsub.add_parser("search", help="optuna search of lr / init_std / scale_emb / "
                                       "scale_depth on a muP proxy (resumable)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value; trials=, sampler=, storage=, "
                                                "parallel=, ... set tunnel.search.*")
    s.add_argument("--width", type=int, default=None,
                   help="also write best-widthN.yaml: the best settings at this width (muP "
                        "carries them over), ready for mcpm train")
    s.set_defaults(func=_run("search", "search_command"))

    tr = tsub.add_parser("transfer", help="lr sweeps at several widths, muP against standard "
                                          "parametrisation")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="key=value; widths=, lrs=, steps= set "
                                                 "tunnel.transfer.*")
    tr.set_defaults(func=_run("transfer", "transfer_command"))

    sc = tsub.add_parser("scale", help="one constant-lr run per width plus branch decays: the "
                                       "(N, D, loss) table that `fit` reads (resumable)")
    sc.add_argument("config")
    sc.add_argument("overrides", nargs="*", help="key=value; widths=, decays=, decay_ratio= "
                                                 "set tunnel.scale.*")
    sc.set_defaults(func=_run("scale", "scale_command"))

    ind = tsub.add_parser("indicator", help="mean loss of reasoning + answer given the question "
                                            "(ScalingBench-style) of a checkpoint")
    ind.add_argument("checkpoint")
    ind.add_argument("data", nargs="?", default="",
                     help="JSONL of {question, reasoning, answer} rows (default: the set mcpm "
                          "ships)")
    ind.add_argument("--batch-size", type=int, default=8)
    ind.add_argument("--seq-len", type=int, default=512)
    ind.add_argument("--out", default="", help="also write the result as JSON here")
    ind.set_defaults(func=_run("indicator", "indicator_command"))

    ds = tsub.add_parser("downstream", help="multiple-choice accuracy of a checkpoint (which of "
                                            "four lines continues the code)")
    ds.add_argument("checkpoint")
    ds.add_argument("data", nargs="?", default="",
                    help="JSONL of {context, choices, answer} rows (default: the set mcpm ships)")
    ds.add_argument("--batch-size", type=int, default=8)
    ds.add_argument("--seq-len", type=int, default=512)
    ds.add_argument("--out", default="", help="also write the result as JSON here")
    ds.set_defaults(func=_run("tasks", "downstream_command"))

    f = tsub.add_parser("fit", help="fit scaling laws to an (N, D, loss) table; constants with "
                                    "intervals, compute-optimal split, plots")
    f.add_argument("results", help="JSONL with n_params, n_tokens, loss per row (what `scale` "
                                   "writes), or a scale workdir")
    f.add_argument("--form", choices=("minicpm", "chinchilla", "both"), default="both")
    f.add_argument("--level", type=float, default=0.9, help="bootstrap interval level")
    f.add_argument("--out", default="", help="folder for the plots and fit.json (default: "
                                             "beside RESULTS)")
    f.set_defaults(func=_run("fit", "fit_command"))
