"""BitCPM4 on this machine: held-out loss of a float model, its post-training ternarisation
(PTQ), ternary QAT from it with 10%, 20% and 40% of its tokens, QAT from scratch with the same
total tokens, per-matrix against group scales, and the float model trained on QAT 40%'s extra
tokens without quantization (what the extra tokens alone give) and a float model trained from
scratch as long as the ternary one (what ternary costs at equal tokens and schedule); then the
size of every export format.

    python experiments/bitcpm.py [--workdir runs/bitcpm] [--out experiments/results] [--smoke]

Writes ``OUT/bitcpm.md``, ``OUT/bitcpm.json`` and ``OUT/bitcpm.png``. Every variant is an
ordinary ``mcpm train`` run under ``--workdir`` (QAT runs start from the float run's model with
``train.init_from``), so a killed experiment resumes where it stopped. The paper's claim being
checked (training spec section 3): QAT needs about 40% of the stage-1 tokens to match QAT from
scratch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import machine_info, write_report  # noqa: E402

from mcpm.config import load_config  # noqa: E402

# ~20M parameters (2.1M of them the 4096 x 512 embedding), muP from the tiny config's base width
MODEL = ["model.hidden_size=512", "model.num_hidden_layers=7", "model.num_attention_heads=8",
         "model.num_key_value_heads=2", "model.intermediate_size=1280",
         "model.dim_model_base=64"]
PLAN = {"seq_len": 128, "batch": 16, "stage1_steps": 500, "fractions": [0.1, 0.2, 0.4],
        "group_size": 128, "group_fraction": 0.4, "eval_batches": 16,
        "stage1_lr": 0.01, "qat_lr": 0.005}


def base_config(workdir: Path, plan: dict, extra=()):
    return load_config("configs/tiny.yaml", MODEL + [
        f"train.workdir={workdir}", f"data.seq_len={plan['seq_len']}",
        f"data.batch_size={plan['batch']}", "train.log_every=10",
        f"train.eval_batches={plan['eval_batches']}", "train.keep_last=1", *extra])


def run(cfg) -> dict:
    from mcpm.train.loop import train
    t0 = time.perf_counter()
    out = train(cfg, progress=True)
    if out["preempted"]:     # stopped by a signal: its checkpoint is saved, rerun to go on
        raise SystemExit(f"{cfg.train.workdir}: stopped by {out['signal']}; rerun to resume")
    out["seconds"] = out.get("seconds") or time.perf_counter() - t0
    return out


def schedule(steps: int, lr: float, warmup_fraction: float = 0.05) -> list[str]:
    return [f"train.steps={steps}", f"train.schedule.peak_lr={lr}",
            f"train.schedule.warmup_steps={max(1, round(steps * warmup_fraction))}",
            f"train.checkpoint_every={max(1, steps // 4)}", f"train.eval_every={max(1, steps // 5)}"]


def ptq_loss(cfg, model_dir: Path) -> float:
    """Held-out loss of the float model with its matrices ternarised as they are (no training):
    the train program's eval step under ``cfg.quant``."""
    import jax

    from mcpm.api import load_params
    from mcpm.train.loop import HeldOut
    from mcpm.train.program import build_train_program
    program = build_train_program(cfg)
    _, _, params = load_params(model_dir)
    params = jax.device_put(params, program.state_shardings["params"])
    return HeldOut(cfg, program).loss(params)[0]


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    return [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]


def export_sizes(model_dir: Path, float_dir: Path, work: Path) -> list[dict]:
    """Bytes on disk of each export format of the QAT model (and of the float model in bf16)."""
    def du(path: Path) -> int:
        return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*"))
                   if p.is_file())
    rows = []
    jobs = [("hf (bf16, float model)", float_dir, ["--format", "hf"]),
            ("hf (bf16 ternary values)", model_dir, ["--format", "hf"]),
            ("packed tq2", model_dir, ["--format", "packed", "--packing", "tq2"]),
            ("packed tq1", model_dir, ["--format", "packed", "--packing", "tq1"]),
            ("gguf TQ2_0", model_dir, ["--format", "gguf", "--packing", "tq2"]),
            ("gguf TQ1_0", model_dir, ["--format", "gguf", "--packing", "tq1"]),
            ("gguf float (F32)", float_dir, ["--format", "gguf"])]
    for label, src, args in jobs:
        out = work / "exports" / label.split(" (")[0].replace(" ", "_")
        out = out.with_name(out.name + ("_float" if src == float_dir else ""))
        cmd = [sys.executable, "-m", "mcpm.cli", "quant", "export", str(src), str(out), *args,
               "--overwrite"]
        if src == float_dir and args[1] == "hf":
            cmd = [sys.executable, "-m", "mcpm.cli", "convert", "to-hf", str(src), str(out),
                   "--dtype", "bfloat16", "--overwrite"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"format": label, "bytes": None, "error": proc.stderr.strip()[-300:]})
            continue
        rows.append({"format": label, "bytes": du(out)})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens = results["tokens_per_step"]
    s1 = results["stage1_steps"]
    for name, curve in results["curves"].items():
        if not curve:
            continue
        offset = 0 if name == "float" or "from scratch" in name else s1
        xs = [(offset + s) * tokens / 1e6 for s, _ in curve]
        ax1.plot(xs, [v for _, v in curve], marker="o", ms=3, label=name)
    ax1.axvline(s1 * tokens / 1e6, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("tokens seen (M)")
    ax1.set_ylabel("held-out loss")
    ax1.set_title("held-out loss during training (ternary runs: the ternary model's)")
    ax1.legend(fontsize=8)
    names = list(results["final"])
    vals = [results["final"][n] for n in names]
    ax2.barh(names, vals, color=["tab:blue" if n.startswith("float") else "tab:orange"
                                 for n in names])
    lo = min(vals)
    ax2.set_xlim(lo - 0.3, max(vals) + 0.1)
    for i, v in enumerate(vals):
        ax2.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax2.set_xlabel("final held-out loss (nats/token)")
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/bitcpm")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--smoke", action="store_true", help="a few steps of a small model")
    args = ap.parse_args()
    plan = dict(PLAN)
    if args.smoke:
        plan.update(stage1_steps=20, eval_batches=2, seq_len=64, batch=4)
    work, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s1 = plan["stage1_steps"]
    extra = ["model.num_hidden_layers=2", "model.hidden_size=128",
             "model.intermediate_size=256"] if args.smoke else []
    tern = ["quant.method=ternary"]
    t_start = time.perf_counter()

    def cfg(name, *more):
        return base_config(work / name, plan, list(more) + extra)

    runs = {}
    print(f"== float stage 1 ({s1} steps)", flush=True)
    float_cfg = cfg("float", *schedule(s1, plan["stage1_lr"]))
    runs["float"] = run(float_cfg)
    float_model = Path(runs["float"]["model"])
    n_params = float_cfg.model.num_params()

    ptq = {}
    for label, group in (("PTQ per matrix", 0), (f"PTQ groups of {plan['group_size']}",
                                                  plan["group_size"])):
        q = cfg("ptq", *tern, f"quant.group_size={group}")
        ptq[label] = ptq_loss(q, float_model)
        print(f"== {label}: held-out {ptq[label]:.4f}", flush=True)

    qat = {}
    for frac in plan["fractions"]:
        steps = max(2, round(s1 * frac))
        name = f"QAT {int(frac * 100)}%"
        print(f"== {name} ({steps} steps from the float model)", flush=True)
        runs[name] = run(cfg(f"qat{int(frac * 100)}", *tern, *schedule(steps, plan["qat_lr"], 0.1),
                             f"train.init_from={float_model}", "data.seed=1"))
        qat[name] = steps
    gsteps = max(2, round(s1 * plan["group_fraction"]))
    gname = f"QAT {int(plan['group_fraction'] * 100)}%, groups of {plan['group_size']}"
    print(f"== {gname}", flush=True)
    runs[gname] = run(cfg("qat_group", *tern, f"quant.group_size={plan['group_size']}",
                          *schedule(gsteps, plan["qat_lr"], 0.1),
                          f"train.init_from={float_model}", "data.seed=1"))
    qat[gname] = gsteps
    # the control: the float model trained on the same extra tokens as QAT 40%, unquantized
    cname = f"float + {int(max(plan['fractions']) * 100)}% (no QAT)"
    csteps = max(2, round(s1 * max(plan["fractions"])))
    print(f"== {cname}", flush=True)
    runs[cname] = run(cfg("float_more", *schedule(csteps, plan["qat_lr"], 0.1),
                          f"train.init_from={float_model}", "data.seed=1"))
    qat[cname] = csteps
    scratch_steps = s1 + round(s1 * max(plan["fractions"]))
    print(f"== ternary QAT from scratch ({scratch_steps} steps)", flush=True)
    runs["scratch"] = run(cfg("scratch", *tern, *schedule(scratch_steps, plan["stage1_lr"])))

    # and the float model of the same single run: what ternary costs at equal tokens and schedule
    print(f"== float from scratch ({scratch_steps} steps)", flush=True)
    runs["float_long"] = run(cfg("float_long", *schedule(scratch_steps, plan["stage1_lr"])))

    tokens_per_step = plan["seq_len"] * plan["batch"]
    final = {"float": runs["float"]["eval_loss"], **ptq}
    final.update({name: runs[name]["eval_loss"] for name in qat})
    final[f"QAT from scratch ({scratch_steps} steps)"] = runs["scratch"]["eval_loss"]
    final[f"float from scratch ({scratch_steps} steps)"] = runs["float_long"]["eval_loss"]
    curves = {"float": eval_curve(work / "float"),
              "QAT from scratch": eval_curve(work / "scratch"),
              "float from scratch": eval_curve(work / "float_long"),
              **{name: eval_curve(Path(runs[name]["run_dir"])) for name in qat}}
    sizes = [] if args.smoke else export_sizes(
        Path(runs["QAT 40%"]["model"]), float_model, work)
    results = {"plan": plan, "model": MODEL + extra, "params": n_params,
               "tokens_per_step": tokens_per_step, "stage1_steps": s1, "qat_steps": qat,
               "scratch_steps": scratch_steps, "final": final, "curves": curves,
               "sizes": sizes, "machine": machine_info(),
               "minutes": (time.perf_counter() - t_start) / 60}
    suffix = "_smoke" if args.smoke else ""
    (out / f"bitcpm{suffix}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"bitcpm{suffix}.png")
    write_report(report(results, suffix), out / f"bitcpm{suffix}.md")


def report(r: dict, suffix: str) -> str:
    m, tok = r["machine"], r["tokens_per_step"]
    s1 = r["stage1_steps"]
    lines = [f"# BitCPM4 ternary QAT on the built-in corpus{' (smoke)' if suffix else ''}", "",
             f"{r['params'] / 1e6:.1f}M-parameter MiniCPM4 ({', '.join(x.split('.', 1)[1] for x in r['model'])}), "
             f"{r['plan']['batch']} x {r['plan']['seq_len']} tokens per step; held-out loss on "
             f"{r['plan']['eval_batches']} batches of the corpus' validation split. "
             f"On {m.get('cpu', '?')} ({m.get('nproc', '?')} cores); this invocation took "
             f"{r['minutes']:.0f} min (runs finished by an earlier one are reused).", "",
             "| variant | tokens (M) | held-out loss | vs float |", "|---|---|---|---|"]
    fl = r["final"]["float"]
    for name, v in r["final"].items():
        if name == "float":
            t = s1 * tok
        elif name.startswith("PTQ"):
            t = s1 * tok
        elif "from scratch" in name:
            t = r["scratch_steps"] * tok
        else:
            t = (s1 + r["qat_steps"][name]) * tok
        lines.append(f"| {name} | {t / 1e6:.2f} | {v:.4f} | {v - fl:+.4f} |")
    if r["sizes"]:
        lines += ["", "| export | size |", "|---|---|"]
        for row in r["sizes"]:
            size = "failed: " + row["error"] if row["bytes"] is None else \
                f"{row['bytes'] / 2**20:.2f} MiB"
            lines.append(f"| {row['format']} | {size} |")
    lines += ["", f"![held-out loss](bitcpm{suffix}.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
