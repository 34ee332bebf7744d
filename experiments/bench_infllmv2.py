"""InfLLM v2 sparse attention (the plain-JAX gathered path) against memory-efficient dense
attention on this CPU, at the MiniCPM4-8B attention layout.

Usage::

    .venv/bin/python experiments/bench_infllmv2.py                 # 8K..128K (~1 h on 2 cores)
    .venv/bin/python experiments/bench_infllmv2.py --quick         # 1K..4K, scaled-down sizes
    .venv/bin/python experiments/bench_infllmv2.py --report-only   # rebuild report + plot from JSON

Layout: batch 1, 32 query heads, 2 kv heads, head dim 128, float32, the released 8B's
``sparse_config`` (kernel 32 / stride 16, block 64, top-64, window 2048, 1 init block) with
``dense_len`` = -1 so every length runs sparse. Random normal q, k, v.

* **dense**: ``kernels.dense_attention.dense_attention_xla`` (FlashAttention-style tiles, causal
  tiles above the diagonal skipped, linear memory), the baseline the issue asks for.
* **sparse**: ``kernels.infllmv2.xla.attention_xla`` (stage 1 tiled selection, then the window
  as dense tiles and the chosen blocks gathered; custom VJP).
* **stage 1**: ``select_block_lists_tiled`` alone (the block lists the sparse path computes
  first); its share is stage-1 time / sparse time in the same run.
* **fwd+bwd**: ``value_and_grad`` of ``<attention(q, k, v), ct>`` for a fixed random ``ct``,
  gradients for q, k and v.

Time: ``jax.jit(f).lower().compile()`` first (not timed in the results), then one call; if it took
less than ``--repeat-below`` seconds, ``--repeats`` more calls and the median. Memory: the
compiled program's ``memory_analysis()`` (temporaries, and arguments + outputs + temporaries as
the peak bound); "largest array" is the biggest array shape in the optimised HLO, the direct
check that no ``T x T`` buffer exists. Cells whose estimated time exceeds ``--max-cell-min`` (from
the same series at the previous length: quadratic for dense, linear for sparse) are not run;
the report gives the estimate, marked "est.".

FLOPs (useful, per the spec's semantics; 2 per multiply-add)::

    dense  = 4 * D * N * sum_i (i + 1)                      # causal q.k and p.v
    stage1 = 2 * D * N * sum_i visible_kernels(i)           # q . compressed keys
    stage2 = 4 * D * N * sum_i attended_keys(i)             # from the selected block lists
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

from _report import machine_info, measure_peak, write_report  # experiments/ is on sys.path

import jax
import jax.numpy as jnp
import numpy as np

from mcpm.config import SparseConfig  # noqa: E402
from mcpm_kernels.dense_attention.xla import dense_attention_xla  # noqa: E402
from mcpm_kernels.infllmv2.xla import attention_xla, select_block_lists_tiled  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

NQ, NKV, D = 32, 2, 128
OFFICIAL = SparseConfig(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                        window_size=2048, topk=64, dense_len=-1)
QUICK = SparseConfig(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                     window_size=256, topk=8, dense_len=-1)
SERIES = [("sparse", "stage1"), ("sparse", "fwd"), ("sparse", "fwd+bwd"),
          ("dense", "fwd"), ("dense", "fwd+bwd")]


# --------------------------------------------------------------------------------------------
# what is computed
# --------------------------------------------------------------------------------------------

def attended_keys(idx_bktp: np.ndarray, valid_bktp: np.ndarray, block_size: int) -> np.ndarray:
    """Keys attended per (kv head, query): the causal part of each selected block."""
    t = idx_bktp.shape[2]
    pos = np.arange(t)[None, None, :, None]
    keys = np.clip(pos - idx_bktp.astype(np.int64) * block_size + 1, 0, block_size)
    return np.where(valid_bktp, keys, 0).sum(-1)                                  # [B, K, T]


def flop_counts(t: int, cfg: SparseConfig, keys_bkt: np.ndarray) -> dict[str, float]:
    i = np.arange(t, dtype=np.float64)
    c = max(0, (t - cfg.kernel_size) // cfg.kernel_stride + 1)
    visible = np.clip((i - cfg.kernel_size + 1) // cfg.kernel_stride + 1, 0, c)
    g = NQ // NKV
    return {"dense": 4.0 * D * NQ * float((i + 1).sum()),
            "stage1": 2.0 * D * NQ * float(visible.sum()),
            # keys_bkt is per kv head; each of its G query heads attends those keys
            "stage2": 4.0 * D * g * float(keys_bkt.sum()),
            "attended_fraction": float(keys_bkt.mean(axis=(0, 1)).sum() / (i + 1).sum())}


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

_SHAPE = re.compile(r"\b(f32|f16|bf16|s32|u32|s8|u8|pred|s64|f64)\[([\d,]*)\]")


def largest_array(hlo_text: str) -> tuple[str, int]:
    best, best_n = "", 0
    for dtype, dims in _SHAPE.findall(hlo_text):
        n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
        if n > best_n:
            best, best_n = f"{dtype}[{dims}]", n
    return best, best_n


def available_ram() -> int:
    """Bytes the kernel says a new allocation can still get (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def measure(fn, args, repeats: int, repeat_below: float) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    shape, elems = largest_array(compiled.as_text())
    temp = int(mem.temp_size_in_bytes)
    # the arguments already exist: the call needs its outputs and temporaries on top
    need = int(mem.output_size_in_bytes + temp - mem.alias_size_in_bytes)
    peak = int(mem.argument_size_in_bytes) + need
    row = {"compile_s": compile_s, "temp_bytes": temp, "peak_bytes": peak,
           "largest_array": shape, "largest_elems": elems}
    if need > 0.9 * available_ram():
        # not run: it would be killed for memory (and the whole benchmark with it)
        return dict(row, no_ram=f"needs {_gib(need)} GiB more, {_gib(available_ram())} "
                    "GiB available")
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times = [time.perf_counter() - t0]
    if times[0] < repeat_below:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    return dict(row, time_s=statistics.median(times), n=len(times))


def functions(cfg: SparseConfig):
    def sparse(q, k, v):
        return attention_xla(q, k, v, cfg)

    def dense(q, k, v):
        return dense_attention_xla(q, k, v)

    def fwd_bwd(f):
        def run(q, k, v, ct):
            return jax.value_and_grad(lambda *a: jnp.vdot(f(*a), ct), argnums=(0, 1, 2))(q, k, v)
        return run

    def stage1(q, k):
        return select_block_lists_tiled(q, k, cfg)

    return {("sparse", "stage1"): stage1, ("sparse", "fwd"): sparse,
            ("sparse", "fwd+bwd"): fwd_bwd(sparse), ("dense", "fwd"): dense,
            ("dense", "fwd+bwd"): fwd_bwd(dense)}


def estimate(results: list[dict], impl: str, mode: str, t: int) -> float | None:
    """Time of (impl, mode) at t from the same series at the longest shorter length."""
    prev = [r for r in results if r["impl"] == impl and r["mode"] == mode and r["t"] < t
            and "time_s" in r]
    if not prev:
        return None
    p = max(prev, key=lambda r: r["t"])
    power = 2.0 if impl == "dense" else 1.0
    return p["time_s"] * (t / p["t"]) ** power


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def _fmt_time(r: dict | None) -> str:
    if r is None:
        return "-"
    if "time_s" in r:
        return f"{r['time_s']:.3g}" + (f" (n={r['n']})" if r["n"] > 1 else "")
    ram = " (not run: RAM)" if "no_ram" in r else ""
    if r.get("estimate_s"):
        return f"~{r['estimate_s']:.3g} est.{ram}"
    if ram:
        return ram.strip(" ()")
    return "skipped"


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f}"


def build_report(data: dict, plot_name: str) -> str:
    res = data["results"]
    lengths = sorted({r["t"] for r in res})
    get = {(r["impl"], r["mode"], r["t"]): r for r in res}
    flops = {int(t): f for t, f in data["flops"].items()}
    info = data["machine"]
    cfg = data["sparse_config"]
    lines = [
        "# InfLLM v2 (plain-JAX gathered path) vs dense attention on this CPU",
        "",
        f"Machine: `nproc` = {info['nproc']}, CPU: {info['cpu']}, backend {info['backend']}, "
        f"jax {info['jax']}. Load average {data['load'][0]:.2f} at the start, "
        f"{data['load'][1]:.2f} at the end (above {info['nproc']} means other processes "
        "competed for the cores).",
        "",
        f"Measured float32 matmul peak (2048^3, best of 5): **{data['peak'][0]:.1f} GFLOP/s** "
        f"at the start, {data['peak'][1]:.1f} at the end."
        + (f" Measured in {data['processes']} processes (`--resume` ran the cells the first "
           "had not)." if data.get("processes", 1) > 1 else ""),
        "",
        f"Layout: batch 1, {NQ} query heads, {NKV} kv heads, head dim {D}, float32. "
        f"`sparse_config`: {cfg} (dense_len -1: sparse at every length). Script: "
        "`experiments/bench_infllmv2.py` (its docstring defines every column).",
        "",
        "## Time (seconds per call; compile excluded)",
        "",
        "| T | dense fwd | sparse fwd | fwd speed-up | stage 1 | stage-1 share | "
        "dense fwd+bwd | sparse fwd+bwd | fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def secs(r):
        if r is None:
            return None
        return r.get("time_s", r.get("estimate_s"))

    def ratio(a, b):
        if secs(a) is None or secs(b) is None:
            return "-"
        est = "time_s" not in a or "time_s" not in b
        return f"{secs(a) / secs(b):.2f}x" + (" est." if est else "")

    for t in lengths:
        df, sf = get.get(("dense", "fwd", t)), get.get(("sparse", "fwd", t))
        db, sb = get.get(("dense", "fwd+bwd", t)), get.get(("sparse", "fwd+bwd", t))
        s1 = get.get(("sparse", "stage1", t))
        share = (f"{100 * s1['time_s'] / sf['time_s']:.0f}%"
                 if s1 and sf and "time_s" in s1 and "time_s" in sf else "-")
        lines.append(f"| {t // 1024}K | {_fmt_time(df)} | {_fmt_time(sf)} | {ratio(df, sf)} | "
                     f"{_fmt_time(s1)} | {share} | {_fmt_time(db)} | {_fmt_time(sb)} | "
                     f"{ratio(db, sb)} |")
    lines += ["", "Achieved GFLOP/s (useful FLOPs, see the docstring) and % of the measured "
              "peak:", "",
              "| T | attended fraction | FLOP ratio dense/sparse | dense fwd GFLOP/s | "
              "sparse fwd GFLOP/s | stage-1 FLOP share |",
              "|---|---|---|---|---|---|"]
    peak = max(data["peak"])
    for t in lengths:
        f = flops[t]
        sparse_flops = f["stage1"] + f["stage2"]
        df, sf = get.get(("dense", "fwd", t)), get.get(("sparse", "fwd", t))

        def rate(r, fl):
            if r is None or "time_s" not in r:
                return "-"
            g = fl / r["time_s"] / 1e9
            return f"{g:.1f} ({100 * g / peak:.0f}%)"
        lines.append(f"| {t // 1024}K | {100 * f['attended_fraction']:.1f}% | "
                     f"{f['dense'] / sparse_flops:.2f} | {rate(df, f['dense'])} | "
                     f"{rate(sf, sparse_flops)} | {100 * f['stage1'] / sparse_flops:.0f}% |")
    lines += ["", "## Memory (compiled `memory_analysis()`, GiB)", "",
              "| T | dense fwd temp | sparse fwd temp | sparse fwd peak | sparse fwd+bwd temp | "
              "sparse fwd+bwd peak | sparse fwd+bwd temp / T (KiB) | largest array, sparse fwd+bwd |",
              "|---|---|---|---|---|---|---|---|"]
    for t in lengths:
        df, sf = get.get(("dense", "fwd", t)), get.get(("sparse", "fwd", t))
        sb = get.get(("sparse", "fwd+bwd", t))

        def m(r, key):
            return _gib(r[key]) if r and key in r else "-"
        per_t = f"{sb['temp_bytes'] / t / 1024:.1f}" if sb and "temp_bytes" in sb else "-"
        big = f"`{sb['largest_array']}`" if sb and "largest_array" in sb else "-"
        lines.append(f"| {t // 1024}K | {m(df, 'temp_bytes')} | {m(sf, 'temp_bytes')} | "
                     f"{m(sf, 'peak_bytes')} | {m(sb, 'temp_bytes')} | {m(sb, 'peak_bytes')} | "
                     f"{per_t} | {big} |")
    lines += ["", f"![time and memory vs length]({plot_name})", "", "## Targets", ""]
    lines += targets(get, lengths)
    return "\n".join(lines) + "\n"


def targets(get: dict, lengths: list[int]) -> list[str]:
    out = []
    t = max(lengths)
    df, sf = get.get(("dense", "fwd", t)), get.get(("sparse", "fwd", t))
    s1 = get.get(("sparse", "stage1", t))
    if df and sf and "time_s" in sf and ("time_s" in df or "estimate_s" in df):
        d = df.get("time_s", df.get("estimate_s"))
        sp = d / sf["time_s"]
        how = "measured" if "time_s" in df else "dense time estimated"
        out.append(f"- Sparse forward at least 4x faster than dense at {t // 1024}K: "
                   f"**{sp:.2f}x** ({how}) -> {'met' if sp >= 4 else 'missed'}.")
    if s1 and sf and "time_s" in s1 and "time_s" in sf:
        share = s1["time_s"] / sf["time_s"]
        out.append(f"- Stage 1 at most 35% of the sparse forward at {t // 1024}K: "
                   f"**{100 * share:.0f}%** -> {'met' if share <= 0.35 else 'missed'}.")
    mem = [(x, get[("sparse", "fwd+bwd", x)]) for x in lengths
           if ("sparse", "fwd+bwd", x) in get and "temp_bytes" in get[("sparse", "fwd+bwd", x)]]
    if len(mem) >= 2:
        (t0, r0), (t1, r1) = mem[0], mem[-1]
        growth = (r1["temp_bytes"] / r0["temp_bytes"]) / (t1 / t0)
        big = (r1["largest_elems"] / r0["largest_elems"]) / (t1 / t0)
        ok = growth <= 1.25 and big <= 1.25
        out.append(f"- Sparse memory linear in T: from {t0 // 1024}K to {t1 // 1024}K the "
                   f"fwd+bwd temporaries grow {growth:.2f}x as fast as T and the largest array "
                   f"{big:.2f}x as fast (at {t1 // 1024}K it is `{r1['largest_array']}`, "
                   f"{r1['largest_elems'] / t1:.0f} x T elements = "
                   f"{r1['largest_elems'] / t1 ** 2:.3f} x T^2) -> {'met' if ok else 'missed'}.")
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = data["results"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("dense", "fwd"): ("tab:red", "-"), ("dense", "fwd+bwd"): ("tab:red", "--"),
              ("sparse", "fwd"): ("tab:blue", "-"), ("sparse", "fwd+bwd"): ("tab:blue", "--"),
              ("sparse", "stage1"): ("tab:green", ":")}
    for (impl, mode), (color, ls) in styles.items():
        rows = sorted((r for r in res if r["impl"] == impl and r["mode"] == mode),
                      key=lambda r: r["t"])
        meas = [(r["t"], r["time_s"]) for r in rows if "time_s" in r]
        est = [(r["t"], r["estimate_s"]) for r in rows if r.get("estimate_s")]
        label = f"{impl} {mode}" if impl == "dense" or mode != "stage1" else "sparse: stage 1"
        if meas:
            ax_t.plot(*zip(*meas), color=color, ls=ls, marker="o", label=label)
        if est:
            pts = meas[-1:] + est
            ax_t.plot(*zip(*pts), color=color, ls=":", marker="o", mfc="none",
                      label=f"{label} (estimated)")
        mem = [(r["t"], r["temp_bytes"] / 2 ** 30) for r in rows if "temp_bytes" in r]
        if mem and mode != "stage1":
            ax_m.plot(*zip(*mem), color=color, ls=ls, marker="o", label=f"{impl} {mode}")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_ylabel("seconds per call")
    ax_t.set_title("time (8B attention layout, CPU, float32)")
    ax_m.set_ylabel("compiled temporaries (GiB)")
    ax_m.set_title("working memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--quick", action="store_true",
                    help="T = 1K..4K with window 256 and top-8 (a smoke run, ~1 min)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-below", type=float, default=20.0,
                    help="repeat a call only when the first took less than this many seconds")
    ap.add_argument("--max-cell-min", type=float, default=25.0,
                    help="skip (and estimate) a cell expected to take longer than this")
    ap.add_argument("--dense-bwd-max", type=int, default=32768,
                    help="longest T for the dense fwd+bwd (longer: estimated)")
    ap.add_argument("--out", default=str(REPO / "experiments/results/infllmv2.md"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells already in the JSON beside --out, run the rest")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report and plot from the JSON beside --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    if args.report_only:
        data = json.loads(json_path.read_text())
        plot(data, png_path)
        write_report(build_report(data, png_path.name), out)
        return

    cfg = QUICK if args.quick else OFFICIAL
    lengths = [1024, 2048, 4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    info = machine_info()
    print(f"machine: {info}", flush=True)
    load0 = _load()
    peak0 = measure_peak(jnp.float32, 2048, 5)
    print(f"float32 matmul peak: {peak0:.1f} GFLOP/s", flush=True)
    data = {"machine": info, "sparse_config": _cfg_text(cfg), "peak": [peak0, peak0],
            "load": [load0, load0], "results": [], "flops": {}}
    if args.resume and json_path.exists():
        data = json.loads(json_path.read_text())
        data["peak"][1] = peak0
        data["processes"] = data.get("processes", 1) + 1
    done = {(r["impl"], r["mode"], r["t"]) for r in data["results"]}
    fns = functions(cfg)
    for t in lengths:
        if all((impl, mode, t) in done for impl, mode in SERIES):
            continue
        kq, kk, kv, kc = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(kq, (1, t, NQ, D), jnp.float32)
        k = jax.random.normal(kk, (1, t, NKV, D), jnp.float32)
        v = jax.random.normal(kv, (1, t, NKV, D), jnp.float32)
        ct = jax.random.normal(kc, (1, t, NQ, D), jnp.float32)
        idx, valid = jax.jit(lambda q, k: select_block_lists_tiled(q, k, cfg))(q, k)
        keys = attended_keys(np.asarray(idx), np.asarray(valid), cfg.block_size)
        data["flops"][str(t)] = flop_counts(t, cfg, keys)
        del idx, valid, keys
        for impl, mode in SERIES:
            if (impl, mode, t) in done:
                continue
            row = {"impl": impl, "mode": mode, "t": t}
            est = estimate(data["results"], impl, mode, t)
            too_long = impl == "dense" and mode == "fwd+bwd" and t > args.dense_bwd_max
            if too_long or (est is not None and est > 60 * args.max_cell_min):
                if impl == "dense" and mode == "fwd+bwd":
                    est = _dense_bwd_estimate(data["results"], t) or est
                row["estimate_s"] = est
                print(f"T={t} {impl} {mode}: skipped, est. {est and est / 60:.1f} min",
                      flush=True)
            else:
                call_args = {"stage1": (q, k), "fwd": (q, k, v), "fwd+bwd": (q, k, v, ct)}[mode]
                row.update(measure(fns[(impl, mode)], call_args, args.repeats,
                                   args.repeat_below))
            if "no_ram" in row:
                row["estimate_s"] = est
                print(f"T={t} {impl} {mode}: not run, {row['no_ram']}", flush=True)
            elif "time_s" in row:
                print(f"T={t} {impl} {mode}: {row['time_s']:.3g} s (n={row['n']}, compile "
                      f"{row['compile_s']:.1f} s), temp {_gib(row['temp_bytes'])} GiB, "
                      f"largest {row['largest_array']}", flush=True)
            data["results"].append(row)
            data["load"][1] = _load()
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(data, indent=1))   # partial results survive a crash
        del q, k, v, ct
    data["peak"][1] = measure_peak(jnp.float32, 2048, 5)
    data["load"][1] = _load()
    json_path.write_text(json.dumps(data, indent=1))
    plot(data, png_path)
    write_report(build_report(data, png_path.name), out)
    print(f"wrote {png_path} and {json_path}")


def _dense_bwd_estimate(results: list[dict], t: int) -> float | None:
    """Dense fwd+bwd at t: the measured dense fwd at t times the fwd+bwd / fwd ratio at the
    longest length where both were measured."""
    get = {(r["impl"], r["mode"], r["t"]): r for r in results}
    fwd = get.get(("dense", "fwd", t))
    both = [x for (i, m, x), r in get.items() if i == "dense" and m == "fwd+bwd" and "time_s" in r
            and "time_s" in get.get(("dense", "fwd", x), {})]
    if not fwd or "time_s" not in fwd or not both:
        return None
    x = max(both)
    return fwd["time_s"] * get[("dense", "fwd+bwd", x)]["time_s"] / get[("dense", "fwd", x)]["time_s"]


def _cfg_text(cfg: SparseConfig) -> str:
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in
                     ("kernel_size", "kernel_stride", "block_size", "topk", "window_size",
                      "init_blocks", "variant"))


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


if __name__ == "__main__":
    main()
