"""The accelerator benchmark: one command, a few minutes on one GPU (written for an H100), each
cell saved as soon as it is measured.

    python experiments/bench_gpu.py                      # all cells, ~6 min budget
    python experiments/bench_gpu.py --only train,decode  # some cells
    python experiments/bench_gpu.py --smoke              # tiny shapes: checks the script on a CPU

Writes ``experiments/results/bench_gpu.json`` (every cell, rewritten after each) and
``bench_gpu.md`` (the tables). A cell that fails records its error and the run goes on; once
``--budget-s`` seconds have passed, the cells left are recorded as skipped.

Cells (in this order, most important first):

* ``fixtures``: float32 logits of the official PyTorch code's fixtures
  (``../shared/fixtures/official-minicpm4``; ``--fixtures DIR``), relative error with no
  setting changed (``model.matmul_precision`` defaults to ``highest``) and with ``default``
  (TF32 on a GPU), to show what the setting buys.
* ``matmul``: bfloat16 and float32 (``highest`` and ``default`` precision) ``n^3`` matmul peaks.
* ``train``: the 0.5B-shape train step (configs/minicpm4-0.5b.yaml: float32 parameters,
  bfloat16 compute, AdamW) built by ``mcpm.train.program.build_train_program`` as a run builds
  it, at 2 x 2048 and 8 x 2048 tokens, packed rows as the data pipeline gives them and, for
  comparison, one document per row without segment ids (the attention ``auto`` then picks:
  cuDNN on a GPU for the latter, the tiled flash kernel for packed rows); tokens/s and MFU
  (6 x matmul params + causal attention per token, as ``mcpm.train.loop``) against the
  bfloat16 peak measured here and against the chip's spec sheet.
* ``prefill``: the cache-less forward of the 0.5B shape in bfloat16, 1 x 2048 and 8 x 2048.
* ``decode``: ``mcpm.generate`` against the bare jitted decode step, per token, B = 1 and 8
  (bfloat16 parameters; experiments/bench_forward.py's method), against the time to read the
  weights once at the chip's spec bandwidth.
* ``attention``: dense causal attention at the 8B layout (32 query / 2 kv heads, D = 128,
  bfloat16, batch 1), forward and forward+backward, 8K to 128K tokens: mcpm's ``auto`` (cuDNN
  here), its ``flash`` kernel, and ``jax.nn.dot_product_attention(implementation="cudnn")``
  called directly as the baseline.
* ``infllmv2``: ``mcpm.infllmv2_attention`` with each implementation at 32K to 128K (the
  released sparse_config, ``dense_len`` -1), forward and forward+backward; the Pallas kernels
  are TPU kernels and are expected to refuse a GPU (recorded as such).

Timings: compile excluded (one untimed call first), then the best of ``--repeats`` calls,
each blocked on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from _report import machine_info, measure_peak, synthetic_batch, write_report  # noqa: E402

# Dense bfloat16 tensor-core peak and HBM bandwidth from the vendors' spec sheets (SXM parts).
SPECS = {"H200": (989.4e12, 4.8e12), "H100": (989.4e12, 3.35e12), "A100": (312e12, 2.0e12),
         "L4": (121e12, 0.3e12)}
CELLS = ("fixtures", "matmul", "train", "prefill", "decode", "attention", "infllmv2")


def spec_of(device_kind: str):
    for name, spec in SPECS.items():
        if name in device_kind:
            return spec
    return None, None


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` (blocked on), after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


@dataclasses.dataclass
class Sizes:
    matmul_n: int
    model: str
    train: tuple            # ((batch, seq), ...)
    prefill: tuple
    decode_batches: tuple
    decode_tokens: tuple    # (short, long) generation lengths, differenced
    attn_lengths: tuple
    sparse_lengths: tuple
    repeats: int


FULL = Sizes(8192, "configs/minicpm4-0.5b.yaml", ((2, 2048), (8, 2048)), ((1, 2048), (8, 2048)),
             (1, 8), (8, 40), (8192, 16384, 32768, 65536, 131072), (32768, 65536, 131072), 3)
SMOKE = Sizes(256, "configs/tiny.yaml", ((2, 64),), ((1, 64),), (1,), (2, 6), (256,), (256,), 1)


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------

def cell_fixtures(args, sizes, report):
    import mcpm
    root = Path(args.fixtures)
    if not root.is_dir():
        return {"skipped": f"no fixtures at {root} (--fixtures DIR)"}
    out = {}
    for case in sorted(p for p in root.iterdir() if (p / "hf").is_dir()):
        ids = np.load(case / "ids.npy").astype(np.int32)
        ref = np.load(case / "logits.npy").astype(np.float64)
        row = {}
        for precision in ("highest", "default"):
            model = mcpm.from_pretrained(case / "hf", matmul_precision=precision)
            got = np.asarray(model(ids), np.float64)
            row[precision] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        out[case.name] = row
    return out


def cell_matmul(args, sizes, report):
    n = sizes.matmul_n
    out = {"n": n, "bf16_tflops": measure_peak(jnp.bfloat16, n, sizes.repeats + 2) / 1e3}
    for precision in ("highest", "default"):
        with jax.default_matmul_precision(precision):
            out[f"f32_{precision}_tflops"] = measure_peak(jnp.float32, n, sizes.repeats + 2) / 1e3
    return out


def _train_config(sizes, batch, seq, extra=()):
    from mcpm.config import load_config
    return load_config(REPO / sizes.model, [
        f"data.batch_size={batch}", f"data.seq_len={seq}", "mesh.data=1", "mesh.fsdp=1",
        "mesh.tensor=1", "model.compute_dtype=bfloat16", *extra])


def cell_train(args, sizes, report):
    from mcpm.train.loop import model_flops_per_token
    from mcpm.train.program import build_train_program
    peak = (report.get("matmul") or {}).get("bf16_tflops")
    spec, _ = spec_of(jax.devices()[0].device_kind)
    rows = []
    for batch, seq in sizes.train:
        for packed in (True, False):
            cfg = _train_config(sizes, batch, seq)
            program = build_train_program(cfg)
            state = program.init()
            # packed: three documents a row, as the pipeline makes them; else no segment ids
            host = synthetic_batch(cfg.model.vocab_size, batch, seq, 3 if packed else None)
            data = jax.device_put(host, program.batch_sharding)
            holder = {"state": state}

            def run():
                holder["state"], metrics = program.step(holder["state"], data)
                return metrics["loss"]
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            compile_s = time.perf_counter() - t0
            dt = best_time(run, sizes.repeats)
            tok_s = batch * seq / dt
            flops = model_flops_per_token(cfg.model, seq) * tok_s
            rows.append({"batch": batch, "seq": seq, "packed": packed, "step_s": dt,
                         "compile_s": compile_s, "tokens_per_s": tok_s,
                         "model_tflops": flops / 1e12,
                         "mfu_measured": flops / (peak * 1e12) if peak else None,
                         "mfu_spec": flops / spec if spec else None})
            holder.clear()   # free this program's state before the next one is made
            _save_partial(args, report, "train", rows)
    return rows


def _model(sizes, *overrides):
    import mcpm
    from flax import nnx
    from mcpm.config import load_config
    cfg = load_config(REPO / sizes.model, list(overrides)).model
    return mcpm.MiniCPM4(cfg, rngs=nnx.Rngs(0))


def cell_prefill(args, sizes, report):
    from flax import nnx
    model = _model(sizes, "model.compute_dtype=bfloat16", "model.param_dtype=bfloat16")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids)[:, -1])
    rows = []
    for batch, seq in sizes.prefill:
        ids = jnp.asarray(np.random.default_rng(1).integers(3, model.config.vocab_size,
                                                             (batch, seq)), jnp.int32)
        dt = best_time(lambda: fwd(state, ids), sizes.repeats)
        rows.append({"batch": batch, "seq": seq, "s": dt, "tokens_per_s": batch * seq / dt})
    return rows


def cell_decode(args, sizes, report):
    from bench_forward import param_bytes, time_generate_vs_step
    model = _model(sizes, "model.compute_dtype=bfloat16", "model.param_dtype=bfloat16")
    _, bandwidth = spec_of(jax.devices()[0].device_kind)
    weights = param_bytes(model.config)
    rows = []
    for batch in sizes.decode_batches:
        r = time_generate_vs_step(model, batch, *sizes.decode_tokens, repeats=sizes.repeats,
                                  calls=2)
        r = {k: v for k, v in r.items() if isinstance(v, (int, float))}
        r.update(batch=batch, weight_bytes=weights,
                 bound_s=weights / bandwidth if bandwidth else None)
        rows.append(r)
    return rows


def _qkv(t, n=32, kv=2, d=128, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (1, t, n, d), dtype),
            jax.random.normal(ks[1], (1, t, kv, d), dtype),
            jax.random.normal(ks[2], (1, t, kv, d), dtype))


def _fwd_bwd(fn, repeats):
    """(forward s, forward+backward s) of ``fn(q, k, v)``."""
    def timings(q, k, v):
        f = jax.jit(fn)
        g = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
        return best_time(lambda: f(q, k, v), repeats), best_time(lambda: g(q, k, v), repeats)
    return timings


def cell_attention(args, sizes, report):
    from mcpm.config import ModelConfig
    from mcpm.model.attention import attention
    cfg = ModelConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=2,
                      compute_dtype="bfloat16")
    impls = {
        "mcpm auto": lambda q, k, v: attention(q, k, v, cfg),
        "mcpm flash": lambda q, k, v: attention(
            q, k, v, dataclasses.replace(cfg, attention_impl="flash")),
        "jax cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"),
    }
    rows = []
    for t in sizes.attn_lengths:
        q, k, v = _qkv(t)
        for name, fn in impls.items():
            row = {"t": t, "impl": name}
            try:
                row["fwd_s"], row["fwd_bwd_s"] = _fwd_bwd(fn, sizes.repeats)(q, k, v)
            except Exception as e:  # noqa: BLE001 - a refusal or OOM is a result here
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            _save_partial(args, report, "attention", rows)
    return rows


def cell_infllmv2(args, sizes, report):
    import mcpm
    from mcpm.config import SparseConfig
    sparse = SparseConfig(dense_len=-1)
    if sizes is SMOKE:
        sparse = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=64,
                              topk=4, dense_len=-1)
    rows = []
    for t in sizes.sparse_lengths:
        q, k, v = _qkv(t)
        for impl in ("xla", "pallas"):
            row = {"t": t, "impl": impl}
            try:
                row["fwd_s"], row["fwd_bwd_s"] = _fwd_bwd(
                    lambda q, k, v: mcpm.infllmv2_attention(q, k, v, sparse, implementation=impl),
                    sizes.repeats)(q, k, v)
            except Exception as e:  # noqa: BLE001 - the TPU kernels refuse a GPU
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            _save_partial(args, report, "infllmv2", rows)
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def _save_partial(args, report, cell, rows):
    report[cell] = {"partial": True, "rows": list(rows)}
    _write(args, report)


def _write(args, report):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out.with_suffix(".json"))


def _tokens(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def render(report) -> str:
    info = report["machine"]
    lines = [f"# Accelerator benchmark: {info.get('device')}", "",
             f"{info.get('device')} ({info.get('backend')}), jax {info.get('jax')}, host "
             f"{info.get('cpu')} x {info.get('nproc')}; {report.get('date')}; total "
             f"{report.get('elapsed_s', 0):.0f} s. Compile excluded; best of "
             f"{report.get('repeats')} blocked calls.", ""]

    def rows_of(cell):
        value = report.get(cell)
        if isinstance(value, dict) and "rows" in value:
            return value["rows"]
        return value

    for cell in CELLS:
        value = report.get(cell)
        lines.append(f"## {cell}")
        lines.append("")
        if value is None:
            lines += ["not run", ""]
            continue
        if isinstance(value, dict) and ("error" in value or "skipped" in value):
            lines += [f"{'error' if 'error' in value else 'skipped'}: "
                      f"{value.get('error') or value.get('skipped')}", ""]
            continue
        rows = rows_of(cell)
        if cell == "fixtures":
            lines += ["| case | rel. error, highest (default setting) | rel. error, default "
                      "(TF32 on GPU) |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(v['highest'])} | {_fmt(v['default'])} |"
                      for k, v in rows.items()]
        elif cell == "matmul":
            lines += ["| n | bf16 TFLOP/s | f32 highest TFLOP/s | f32 default TFLOP/s |",
                      "|---|---|---|---|",
                      f"| {rows['n']} | {_fmt(rows['bf16_tflops'], '.1f')} | "
                      f"{_fmt(rows['f32_highest_tflops'], '.1f')} | "
                      f"{_fmt(rows['f32_default_tflops'], '.1f')} |"]
        elif cell == "train":
            lines += ["| batch x seq | rows | step ms | tokens/s | model TFLOP/s | MFU (measured "
                      "bf16 peak) | MFU (spec) | compile s |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['batch']} x {r['seq']} | {'packed' if r['packed'] else 'one doc'} | "
                      f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                      f"{r['model_tflops']:.1f} | {_fmt(r['mfu_measured'], '.1%')} | "
                      f"{_fmt(r['mfu_spec'], '.1%')} | {r['compile_s']:.0f} |" for r in rows]
        elif cell == "prefill":
            lines += ["| batch x seq | ms | tokens/s |", "|---|---|---|"]
            lines += [f"| {r['batch']} x {r['seq']} | {1e3 * r['s']:.1f} | "
                      f"{r['tokens_per_s']:,.0f} |" for r in rows]
        elif cell == "decode":
            lines += ["| B | bare step ms | generate ms/token | generate / step | weights "
                      "read at spec bandwidth ms |", "|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {1e3 * r['step_s']:.2f} | {1e3 * r['gen_s']:.2f} | "
                      f"{r['gen_s'] / r['step_s']:.2f} | "
                      f"{_fmt(r['bound_s'] and 1e3 * r['bound_s'], '.2f')} |" for r in rows]
        else:
            lines += ["| T | implementation | fwd ms | fwd+bwd ms | note |", "|---|---|---|---|---|"]
            lines += [f"| {_tokens(r['t'])} | {r['impl']} | "
                      f"{_fmt(r.get('fwd_s') and 1e3 * r['fwd_s'], '.1f')} | "
                      f"{_fmt(r.get('fwd_bwd_s') and 1e3 * r['fwd_bwd_s'], '.1f')} | "
                      f"{r.get('error', '')} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help=f"comma-separated cells of {list(CELLS)}")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the cells left after this many seconds (default 330)")
    ap.add_argument("--fixtures", default=str(REPO.parent / "shared" / "fixtures"
                                              / "official-minicpm4"))
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_gpu.md"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    cells = CELLS if not args.only else tuple(c for c in CELLS if c in args.only.split(","))
    start = time.perf_counter()
    device = jax.devices()[0]
    report = {"machine": {**machine_info(), "device": device.device_kind},
              "date": time.strftime("%Y-%m-%d %H:%M"), "repeats": sizes.repeats,
              "smoke": args.smoke}
    for cell in cells:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report[cell] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            continue
        print(f"== {cell} ({elapsed:.0f} s so far)", flush=True)
        try:
            report[cell] = globals()[f"cell_{cell}"](args, sizes, report)
        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
            traceback.print_exc()
            report[cell] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        report["elapsed_s"] = time.perf_counter() - start
        _write(args, report)
        print(json.dumps(report[cell], default=str)[:2000], flush=True)
    write_report(render(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
