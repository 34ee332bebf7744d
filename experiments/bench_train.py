"""Train-step throughput and MFU on this CPU: tiny and the ~0.1B tunnel proxy, on one device
and on 8 simulated CPU devices (the same cores, split 8 ways: this measures the sharding
overhead, not a speed-up).

MFU = model FLOP/s (6 x matmul params + causal attention, per token; see
mcpm.train.loop.model_flops_per_token) / the machine's float32 matmul FLOP/s measured in the
same process (one device, all cores). Synthetic token batches; the data pipeline is not timed.

    python experiments/bench_train.py [--steps 3] [--out experiments/results/bench_train.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("tiny", "configs/tiny.yaml", 16, 256), ("tunnel-0.1b", "configs/tunnel-0.1b.yaml", 8, 512)]


def worker(config: str, batch: int, seq_len: int, steps: int, mesh: str) -> dict:
    import jax
    sys.path.insert(0, str(ROOT / "experiments"))
    from _report import synthetic_batch

    from mcpm.config import load_config
    from mcpm.train.loop import measure_peak_flops, model_flops_per_token
    from mcpm.train.program import build_train_program

    data, fsdp, tensor = (int(x) for x in mesh.split("x"))
    cfg = load_config(ROOT / config, [f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                      f"mesh.tensor={tensor}", f"data.batch_size={batch}",
                                      f"data.seq_len={seq_len}"])
    peak = measure_peak_flops()
    # the step a run executes (schedule, z-loss, accumulation, shardings: the config's)
    program = build_train_program(cfg)
    state, step, b_sh = program.init(), program.step, program.batch_sharding
    host = synthetic_batch(cfg.model.vocab_size, batch, seq_len)
    gbatch = jax.device_put(host, b_sh)
    t0 = time.perf_counter()
    state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq_len / dt
    flops = model_flops_per_token(cfg.model, seq_len) * tok_s
    return {"params_m": cfg.model.num_params() / 1e6, "devices": jax.device_count(),
            "step_s": dt, "compile_s": compile_s, "tokens_per_s": tok_s,
            "model_gflops": flops / 1e9, "peak_gflops": peak / 1e9, "mfu": flops / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/bench_train.md"))
    ap.add_argument("--worker", nargs=5, metavar=("CONFIG", "BATCH", "SEQ", "STEPS", "MESH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        c, b, s, n, mesh = args.worker
        print(json.dumps(worker(c, int(b), int(s), int(n), mesh)))
        return
    sys.path.insert(0, str(ROOT / "experiments"))
    from _report import write_report

    load_start = os.getloadavg()[0]
    rows = []
    for name, config, batch, seq in CASES:
        for devices, mesh in ((1, "1x1x1"), (8, "2x4x1")):
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
            print(f"== {name}: {devices} device(s), mesh data x fsdp x tensor = {mesh}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--worker", config, str(batch),
                                   str(seq), str(args.steps), mesh],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(r, flush=True)
            rows.append((name, batch, seq, mesh, r))
    load = os.getloadavg()[0]
    lines = ["# Train-step throughput and MFU on this CPU", "",
             f"{os.cpu_count()} CPU cores; float32; synthetic batches; {args.steps} timed steps "
             f"after one compile step; load average {load_start:.1f} at the start, {load:.1f} at "
             "the end (the 8-device workers' own threads count too). MFU is model FLOP/s "
             "over the float32 matmul peak measured in the same process (one device, all "
             "cores); 8 simulated devices share the same cores.", "",
             "| model | params | batch x seq | devices (data x fsdp x tensor) | step (s) | "
             "tokens/s | model GFLOP/s | peak GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, batch, seq, mesh, r in rows:
        lines.append(f"| {name} | {r['params_m']:.1f}M | {batch} x {seq} | {r['devices']} "
                     f"({mesh}) | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['model_gflops']:.1f} | {r['peak_gflops']:.1f} | {100 * r['mfu']:.0f}% |")
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
