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
    keys = SECTION_ALIASES.get(action, ())
    return [f"tunnel.{action}.{x}" if x.split("=", 1)[0] in keys else x for x in items]


def load_section_config(action: str, args):
    """``args.config`` with ``args.overrides``, bare keys going to ``tunnel.ACTION.*``."""
    from mcpm.cli import load_with_aliases
    return load_with_aliases(args.config, list(args.overrides), SECTION_ALIASES[action],
                             f"tunnel.{action}.")


def _run(module: str, function: str):
    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"mcpm.tunnel.{module}"), function)(args)
    return call


def register(sub) -> None:
    """Add ``tunnel`` and its actions to the top-level subparsers ``sub``."""
    t = sub.add_parser("tunnel", help="ModelTunnel v2: muP proxy searches, lr transfer, the "
                                      "indicator, scaling-law fits")
    tsub = t.add_subparsers(dest="action", required=True)

    sweeps = {"search": ("optuna search of lr / init_std / scale_emb / scale_depth on a muP "
                         "proxy (resumable)", "trials=, sampler=, storage=, parallel=, ..."),
              "transfer": ("lr sweeps at several widths, muP against standard "
                           "parametrisation", "widths=, lrs=, steps="),
              "scale": ("one constant-lr run per width plus branch decays: the (N, D, loss) "
                        "table that `fit` reads (resumable)", "widths=, decays=, decay_ratio=")}
    for action, (text, keys) in sweeps.items():
        p = tsub.add_parser(action, help=text)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help=f"key=value; {keys} set tunnel.{action}.*")
        p.set_defaults(func=_run(action, f"{action}_command"))
        if action == "search":
            p.add_argument("--width", type=int, default=None,
                           help="also write best-widthN.yaml: the best settings at this width "
                                "(muP carries them over), ready for mcpm train")

    evals = {"indicator": ("mean loss of reasoning + answer given the question "
                           "(ScalingBench-style) of a checkpoint",
                           "{question, reasoning, answer}", "indicator"),
             "downstream": ("multiple-choice accuracy of a checkpoint (which of four lines "
                            "continues the code)", "{context, choices, answer}", "tasks")}
    for action, (text, fields, module) in evals.items():
        p = tsub.add_parser(action, help=text)
        p.add_argument("checkpoint")
        p.add_argument("data", nargs="?", default="",
                       help=f"JSONL of {fields} rows (default: the set mcpm ships)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--out", default="", help="also write the result as JSON here")
        p.set_defaults(func=_run(module, f"{action}_command"))

    f = tsub.add_parser("fit", help="fit scaling laws to an (N, D, loss) table; constants with "
                                    "intervals, compute-optimal split, plots")
    f.add_argument("results", help="JSONL with n_params, n_tokens, loss per row (what `scale` "
                                   "writes), or a scale workdir")
    f.add_argument("--form", choices=("minicpm", "chinchilla", "both"), default="both")
    f.add_argument("--level", type=float, default=0.9, help="bootstrap interval level")
    f.add_argument("--out", default="", help="folder for the plots and fit.json (default: "
                                             "beside RESULTS)")
    f.set_defaults(func=_run("fit", "fit_command"))
