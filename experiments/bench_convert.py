"""Peak memory of ``mcpm convert`` against the checkpoint's size (the target: converting never
holds two copies in memory; peak RSS at most 1.3x the checkpoint's size).

Usage::

    .venv/bin/python experiments/bench_convert.py              # 0.5B shape, bf16, single + sharded
    .venv/bin/python experiments/bench_convert.py --layouts sharded --keep /tmp/x

Steps (everything under a fresh ``/tmp/mcpm-bench-convert-*`` directory, removed at the end):

1. **Generate** an official-format Hugging Face checkpoint of the MiniCPM4-0.5B shape
   (configs/minicpm4-0.5b.yaml) in bfloat16, in a *separate* Python process that never builds
   the JAX model: random ``ml_dtypes.bfloat16`` numpy arrays with the shapes of
   ``mcpm.model.minicpm4.param_shapes`` written by ``mcpm.hf.write_hf_checkpoint`` (that process
   holds one copy; its memory is reported but is not part of any ratio). Written once as a single
   ``model.safetensors`` and once sharded (``max_shard_size=300MB``, exercising the index path).
2. **Baseline**: peak RSS of a fresh process that only imports what the CLI's convert path
   imports (jax, mcpm, mcpm.hf, mcpm.checkpoint, orbax.checkpoint) and starts the CPU backend.
3. **Convert**: ``mcpm convert from-hf HF MCPM`` and ``mcpm convert to-hf MCPM HF2`` (the
   console script next to this interpreter), each in a fresh child process; peak RSS is that
   child's ``ru_maxrss`` from ``os.wait4`` (only that child, so earlier children cannot pollute
   it). A sampler also reads ``/proc/PID/status`` every 20 ms to split the peak into anonymous
   memory (``RssAnon``: numpy/XLA buffers) and file-backed pages (``RssFile``: mmapped
   safetensors and shared libraries), and to say in which phase the peak happens.
4. **Ratios**, both stated: ``peak / checkpoint bytes`` (nothing subtracted) and
   ``(peak - baseline) / checkpoint bytes``. Checkpoint bytes = the sum of the ``*.safetensors``
   file sizes of the input.
5. **Round trip**: every tensor of the to-hf output is compared bit for bit (as uint16) with the
   generated input, one tensor at a time with ``safetensors.safe_open``; names, shapes, dtypes,
   the shard layout and config.json are compared too.
6. **Diagnosis** (skip with ``--no-diagnose``): where the peak comes from, each phase in a fresh
   process with VmHWM reset just before it (``/proc/self/clear_refs``): ``read_hf_checkpoint``
   (per layout), ``mcpm.checkpoint.save_checkpoint`` versus orbax saves without the numpy
   deep copy and without OCDBT, and ``mcpm.checkpoint.load_checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _report import write_report  # experiments/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "minicpm4-0.5b.yaml"
BASELINE_CODE = ("import jax, jax.numpy as jnp, numpy, ml_dtypes, safetensors, orbax.checkpoint, "
                 "mcpm, mcpm.cli, mcpm.hf, mcpm.checkpoint; jnp.zeros(8).block_until_ready()")
MiB = 2 ** 20


# --------------------------------------------------------------------------------------------
# child: generate the checkpoint (never builds the JAX model)
# --------------------------------------------------------------------------------------------

def generate_checkpoint(out_dir: str, max_shard_size: str, seed: int) -> None:
    import ml_dtypes
    import numpy as np

    from mcpm.config import load_config
    from mcpm.hf import write_hf_checkpoint
    from mcpm.model.minicpm4 import param_shapes

    cfg = load_config(CONFIG, ["model.param_dtype=bfloat16"]).model
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 0.02
        if name.endswith("norm"):
            x += 1.0
        params[name] = x.astype(ml_dtypes.bfloat16)
        del x
    write_hf_checkpoint(params, cfg, out_dir, max_shard_size=max_shard_size)


# --------------------------------------------------------------------------------------------
# child: attribute the peak to phases (where does the extra copy come from?)
# --------------------------------------------------------------------------------------------

def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the current RSS in bytes."""
    import gc
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _kib("VmRSS")


SAVE_VARIANTS = {
    "mcpm": "mcpm.checkpoint.save_checkpoint (what `convert from-hf` runs: orbax "
            "PyTreeCheckpointHandler, no host deep copy, no OCDBT, 64 MiB chunks, 0.25 GB in "
            "flight)",
    "no-deepcopy": "orbax PyTreeCheckpointHandler, NumpyHandler(deepcopy_host_arrays=False), OCDBT",
    "no-deepcopy-no-ocdbt": "as above with use_ocdbt=False",
}


def diagnose_from_hf(hf_dir: str, out_dir: str, variant: str) -> None:
    """Phase by phase: read_hf_checkpoint, then one way of saving; peaks above the RSS before."""
    import numpy as np

    from mcpm.checkpoint import save_checkpoint
    from mcpm.hf import read_hf_checkpoint

    before = _reset_peak()
    cfg, hf_config, params = read_hf_checkpoint(hf_dir)
    nbytes = sum(v.nbytes for v in params.values())
    read_peak = _kib("VmHWM") - before
    before_save = _reset_peak()
    if variant == "read-only":
        pass
    elif variant == "mcpm":
        save_checkpoint(out_dir, cfg, params, hf_config_template=hf_config)
    else:
        import orbax.checkpoint as ocp
        reg = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
        ck = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
            use_ocdbt=variant != "no-deepcopy-no-ocdbt", type_handler_registry=reg))
        ck.save(Path(out_dir).absolute() / "params", args=ocp.args.PyTreeSave(dict(params)))
        ck.close()
    save_extra = _kib("VmHWM") - before_save
    print(json.dumps({"variant": variant, "params_bytes": nbytes, "read_extra": read_peak - nbytes,
                      "save_extra": save_extra}))


def diagnose_load(mcpm_dir: str) -> None:
    """load_checkpoint (what `convert to-hf` runs first): peak above the result it returns."""
    from mcpm.checkpoint import load_checkpoint

    before = _reset_peak()
    _, _, params = load_checkpoint(mcpm_dir)
    nbytes = sum(v.nbytes for v in params.values())
    print(json.dumps({"params_bytes": nbytes, "load_extra": _kib("VmHWM") - before - nbytes,
                      "kept_after": _kib("VmRSS") - before - nbytes}))


# --------------------------------------------------------------------------------------------
# parent: measurement
# --------------------------------------------------------------------------------------------

def _status_kib(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def run_measured(cmd: list[str], log: Path, env=None) -> dict:
    """Run ``cmd`` in a fresh child; its own ru_maxrss (os.wait4) plus sampled RSS components."""
    samples: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample():
            while not done.is_set():
                s = _status_kib(proc.pid)
                if s:
                    samples.append((time.perf_counter() - t0, s))
                done.wait(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    peak_sample = max(samples, key=lambda ts: ts[1].get("VmRSS", 0)) if samples else (0, {})
    return {
        "cmd": cmd, "wall_s": wall,
        "maxrss": usage.ru_maxrss * 1024,                      # Linux: KiB
        "sampled_peak": peak_sample[1].get("VmRSS", 0) * 1024,
        "peak_anon": peak_sample[1].get("RssAnon", 0) * 1024,
        "peak_file": peak_sample[1].get("RssFile", 0) * 1024,
        "peak_at_s": peak_sample[0],
        "max_anon": max((s.get("RssAnon", 0) for _, s in samples), default=0) * 1024,
        "max_file": max((s.get("RssFile", 0) for _, s in samples), default=0) * 1024,
        "n_samples": len(samples),
        "timeline": [(round(t, 2), s.get("RssAnon", 0) // 1024, s.get("RssFile", 0) // 1024)
                     for t, s in samples],
    }


def safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def weight_map(d: Path) -> dict[str, str]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        return {k: "model.safetensors" for k in f.keys()}


def compare_checkpoints(a: Path, b: Path) -> tuple[bool, str]:
    """Bitwise tensor-by-tensor comparison (one tensor pair in memory at a time)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
    import numpy as np
    from safetensors import safe_open

    wa, wb = weight_map(a), weight_map(b)
    if set(wa) != set(wb):
        return False, f"tensor names differ: {sorted(set(wa) ^ set(wb))[:5]}"
    problems, n, nbytes = [], 0, 0
    same_layout = wa == wb
    by_file: dict[str, list[str]] = {}
    for name, fname in wa.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        with safe_open(str(a / fname), framework="numpy") as fa:
            for name in names:
                with safe_open(str(b / wb[name]), framework="numpy") as fb:
                    x, y = fa.get_tensor(name), fb.get_tensor(name)
                if x.dtype != y.dtype or x.shape != y.shape:
                    problems.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
                elif not np.array_equal(x.view(np.uint16) if x.dtype.itemsize == 2 else x,
                                        y.view(np.uint16) if y.dtype.itemsize == 2 else y):
                    problems.append(f"{name}: values differ")
                n += 1
                nbytes += x.nbytes
                del x, y
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    cfg_diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    msg = (f"{n} tensors ({nbytes / MiB:,.0f} MiB) bit-identical; shard layout "
           f"{'identical' if same_layout else 'differs'}; config.json "
           f"{'identical' if not cfg_diff else 'differs in ' + str(cfg_diff)}")
    if problems:
        return False, f"{len(problems)} mismatches: {problems[:5]}"
    return True, msg


def mcpm_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mcpm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mcpm.cli"]


def fmt_mib(x: float) -> str:
    return f"{x / MiB:,.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="single,sharded",
                   help="comma-separated: single (one model.safetensors), sharded (300MB shards)")
    p.add_argument("--shard-size", default="300MB")
    p.add_argument("--tmp", default="/tmp", help="parent of the temporary work directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_convert.md"))
    p.add_argument("--timeline", action="store_true", help="print the RSS timelines")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip attributing the peaks to phases (read / orbax save / orbax load)")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    for layout in layouts:
        if layout not in ("single", "sharded"):
            p.error(f"unknown layout {layout!r}")

    work = Path(tempfile.mkdtemp(prefix="mcpm-bench-convert-", dir=args.tmp))
    py = sys.executable
    env = dict(os.environ, TQDM_DISABLE="1")
    print(f"work dir {work}", flush=True)
    rows, checks, notes, timelines, diag, read_extra = [], [], [], {}, None, {}
    t_start = time.perf_counter()
    try:
        base = run_measured([py, "-c", BASELINE_CODE], work / "baseline.log", env)
        baseline = base["maxrss"]
        print(f"baseline (import jax + mcpm + orbax, CPU backend up): {fmt_mib(baseline)} MiB",
              flush=True)
        for layout in layouts:
            shard = args.shard_size if layout == "sharded" else "100GB"
            hf = work / f"hf-{layout}"
            gen = run_measured([py, __file__, "_generate", str(hf), shard], work / "gen.log", env)
            size = safetensors_bytes(hf)
            nfiles = len(list(hf.glob("*.safetensors")))
            print(f"[{layout}] generated {nfiles} safetensors file(s), {fmt_mib(size)} MiB, in "
                  f"{gen['wall_s']:.1f}s (generator peak {fmt_mib(gen['maxrss'])} MiB)",
                  flush=True)
            mc = work / f"mcpm-{layout}"
            hf2 = work / f"hf2-{layout}"
            steps = [
                ("from-hf", mcpm_cmd() + ["convert", "from-hf", str(hf), str(mc)]),
                ("to-hf", mcpm_cmd() + ["convert", "to-hf", str(mc), str(hf2),
                                        "--max-shard-size", shard]),
            ]
            for what, cmd in steps:
                r = run_measured(cmd, work / f"{what}-{layout}.log", env)
                timelines[f"{what} {layout}"] = r["timeline"]
                ratio = r["maxrss"] / size
                ratio_net = (r["maxrss"] - baseline) / size
                rows.append([f"`convert {what}`", f"{layout} ({nfiles} file{'s' * (nfiles > 1)})",
                             fmt_mib(size), fmt_mib(r["maxrss"]), f"**{ratio:.2f}**",
                             f"**{ratio_net:.2f}**",
                             f"{fmt_mib(r['peak_anon'])} + {fmt_mib(r['peak_file'])}",
                             f"{r['peak_at_s']:.1f} / {r['wall_s']:.1f}"])
                print(f"[{layout}] {what}: peak RSS {fmt_mib(r['maxrss'])} MiB = {ratio:.2f}x "
                      f"the checkpoint ({ratio_net:.2f}x after subtracting the baseline); at the "
                      f"sampled peak anon {fmt_mib(r['peak_anon'])} + file "
                      f"{fmt_mib(r['peak_file'])} MiB at {r['peak_at_s']:.1f}s of "
                      f"{r['wall_s']:.1f}s", flush=True)
            ok, msg = compare_checkpoints(hf, hf2)
            checks.append(f"- {layout}: {'OK' if ok else 'FAILED'}: {msg}")
            print(f"[{layout}] round trip: {'OK' if ok else 'FAILED'}: {msg}", flush=True)
            notes.append(f"- {layout}: HF input {fmt_mib(size)} MiB in {nfiles} file(s); mcpm "
                         f"(orbax) checkpoint {fmt_mib(dir_bytes(mc))} MiB on disk; generator "
                         f"process peak {fmt_mib(gen['maxrss'])} MiB (one copy by design, not "
                         "counted)")
            if not ok:
                raise SystemExit(f"round trip failed: {msg}")
            if args.diagnose:
                r = subprocess.run([py, __file__, "_diagnose_from_hf", str(hf), "-", "read-only"],
                                   capture_output=True, text=True, env=env, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                read_extra[layout] = res["read_extra"]
                print(f"  diagnose read_hf_checkpoint ({layout}): peak = params + "
                      f"{fmt_mib(res['read_extra'])} MiB", flush=True)
                if layout == layouts[-1]:
                    diag = run_diagnosis(py, hf, mc, work, env)
                    diag["read"] = read_extra
            shutil.rmtree(hf, ignore_errors=True)
            shutil.rmtree(mc, ignore_errors=True)
            shutil.rmtree(hf2, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.timeline:
        for k, tl in timelines.items():
            print(k, "(s, anon MiB, file MiB):", tl[:: max(1, len(tl) // 60)])
    md = render(rows, checks, notes, baseline, time.perf_counter() - t_start, args, diag)
    write_report(md, args.out)
    return 0


def run_diagnosis(py: str, hf: Path, mc: Path, work: Path, env) -> dict:
    """Each phase in its own fresh process, peaks measured from a reset VmHWM."""
    out = {"layout": hf.name, "save": []}
    for variant in SAVE_VARIANTS:
        target = work / f"diag-{variant}"
        r = subprocess.run([py, __file__, "_diagnose_from_hf", str(hf), str(target), variant],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"diagnosis {variant} failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out["save"].append(res)
        print(f"  diagnose {variant}: read_hf_checkpoint peak = params + "
              f"{fmt_mib(res['read_extra'])} MiB; save peak = +{fmt_mib(res['save_extra'])} MiB "
              f"({res['save_extra'] / res['params_bytes']:.2f}x the params)", flush=True)
        shutil.rmtree(target, ignore_errors=True)
    r = subprocess.run([py, __file__, "_diagnose_load", str(mc)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"diagnosis load failed:\n{r.stderr[-3000:]}")
    out["load"] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  diagnose load_checkpoint: peak = result + {fmt_mib(out['load']['load_extra'])} MiB "
          f"({out['load']['load_extra'] / out['load']['params_bytes']:.2f}x)", flush=True)
    return out


def render_diagnosis(diag: dict | None) -> str:
    if not diag:
        return ""
    rows = []
    for res in diag["save"]:
        rows.append(f"| {SAVE_VARIANTS[res['variant']]} | {fmt_mib(res['params_bytes'])} | "
                    f"+{fmt_mib(res['save_extra'])} | "
                    f"**{res['save_extra'] / res['params_bytes']:.2f}x** |")
    ld = diag["load"]
    reads = "; ".join(f"{layout} input: params + {fmt_mib(x)} MiB"
                      for layout, x in diag["read"].items())
    return "\n".join([
        "## Where the memory goes (each phase in a fresh process, peak measured from a reset "
        f"VmHWM, i.e. above the RSS just before the phase; save/load on the {diag['layout']} "
        "input)",
        "",
        f"- `read_hf_checkpoint` (first half of `convert from-hf`): peak = {reads} (one "
        "tensor in flight; files are read with plain reads, so no mmapped pages stay resident).",
        f"- `load_checkpoint` (orbax restore, first half of `convert to-hf`): peak = the params it "
        f"returns + {fmt_mib(ld['load_extra'])} MiB "
        f"(**{ld['load_extra'] / ld['params_bytes']:.2f}x**); "
        f"{fmt_mib(ld['kept_after'])} MiB beyond the params is still resident after it returns.",
        "- Saving the params (second half of `convert from-hf`), extra memory above the params:",
        "",
        "| how the params are saved | params MiB | extra MiB at peak | extra / params |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def render(rows, checks, notes, baseline, total, args, diag=None) -> str:
    import platform

    import jax
    header = ["command", "input layout", "checkpoint MiB", "peak RSS MiB",
              "peak / size", "(peak - baseline) / size", "anon + file MiB at peak",
              "peak at s / wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([
        "# mcpm convert: peak memory vs checkpoint size",
        "",
        f"MiniCPM4-0.5B shape (configs/minicpm4-0.5b.yaml, "
        f"{_num_params() / 1e6:.1f}M parameters), random bfloat16 weights, official HF layout. "
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, jax {jax.__version__}. "
        "Each conversion ran in a fresh child process; peak RSS is that child's `ru_maxrss`.",
        "",
        f"Baseline (a fresh process importing jax, mcpm, orbax and starting the CPU backend): "
        f"**{fmt_mib(baseline)} MiB**.",
        "",
        "\n".join(lines),
        "",
        "\"anon + file\": RssAnon (heap: numpy/XLA buffers) and RssFile (file-backed pages: "
        "mmapped safetensors, shared libraries) from /proc at the sampled peak (20 ms sampling).",
        "",
        "Round trip (to-hf output vs generated input, tensor by tensor, bitwise):",
        "",
        "\n".join(checks),
        "",
        "Sizes:",
        "",
        "\n".join(notes),
        "",
        render_diagnosis(diag),
        f"Total wall time: {total:.0f} s.",
        "",
    ])


def _num_params() -> int:
    from mcpm.config import load_config
    return load_config(CONFIG).model.num_params()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        generate_checkpoint(sys.argv[2], sys.argv[3], seed=0)
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_diagnose_from_hf":
        diagnose_from_hf(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_diagnose_load":
        diagnose_load(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
