"""Decode speed and weight bytes per token of a ternary model held packed (tq2, tq1) against the
bfloat16 float model, on this machine (XLA unpack path: each layer's bytes are unpacked to
bfloat16 inside the scan of every decode step).

Usage::

    .venv/bin/python experiments/bench_ternary.py             # hidden 1024, 8 layers, vocab 4096
    .venv/bin/python experiments/bench_ternary.py --quick     # a small shape (smoke run)

What is measured (random weights, batch 1, an 8-token prompt, greedy, eos -1 so every call runs
all its steps, bfloat16 compute for all three models):

* **bf16**: the float model with bfloat16 parameters (the weights are the ternary model's
  ``q * scale`` rounded to bfloat16: the HF release form).
* **tq2 / tq1**: ``mcpm.from_pretrained`` of the packed export of the same ternary checkpoint
  (one scale per matrix and layer); embeddings and norms in bfloat16 (param_dtype).
* **ms/token**: ``mcpm.generate`` per generated token by differencing,
  (t(N_long) - t(N_short)) / (N_long - N_short), best of ``--repeats`` runs after a warm-up,
  so the prefill and per-call work cancel.
* **weight bytes/token**: the bytes of every parameter array the model holds (packed bytes,
  scales, embedding, norms): one decode step reads all of them once (the tied head reads the
  whole embedding). The KV cache is not counted.

Writes ``experiments/results/bench_ternary.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mcpm  # noqa: E402
from mcpm._files import write_json  # noqa: E402
from mcpm.api import model_from_params, params_of  # noqa: E402
from mcpm.checkpoint import save_checkpoint  # noqa: E402
from mcpm.config import ModelConfig, QuantConfig  # noqa: E402
from mcpm.quant.packed import write_packed  # noqa: E402
from mcpm.quant.qat import QUANT_FILE, quant_info, ternarize_params  # noqa: E402


def weight_bytes(model) -> int:
    state = nnx.state(model)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def ms_per_token(model, n_short: int, n_long: int, repeats: int) -> float:
    prompt = np.arange(3, 11, dtype=np.int32)[None, :]

    def timed(n):
        t0 = time.perf_counter()
        out = mcpm.generate(model, prompt, n, eos_token_id=-1)
        np.asarray(out)
        return time.perf_counter() - t0
    timed(n_short), timed(n_long)            # compile and first runs
    best_short = min(timed(n_short) for _ in range(repeats))
    best_long = min(timed(n_long) for _ in range(repeats))
    return 1000 * (best_long - best_short) / (n_long - n_short)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_ternary.json"))
    args = p.parse_args(argv)
    shape = (dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, vocab_size=1024)
             if args.quick else
             dict(hidden_size=1024, intermediate_size=2560, num_hidden_layers=8, vocab_size=4096))
    h = shape["hidden_size"]
    cfg = ModelConfig(**shape, num_attention_heads=h // 64, num_key_value_heads=h // 256,
                      max_position_embeddings=512, dim_model_base=256, eos_token_id=(2,),
                      param_dtype="bfloat16", compute_dtype="bfloat16")
    n_short, n_long = (4, 20) if args.quick else (8, 72)
    # float32 latent weights, as training keeps them; the ternary model is made from them
    params = params_of(mcpm.MiniCPM4(dataclasses.replace(cfg, param_dtype="float32"),
                                     rngs=nnx.Rngs(0)))
    qcfg = QuantConfig(method="ternary")
    tparams = ternarize_params(params, qcfg, cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ternary", cfg, tparams,
                        extra_files={QUANT_FILE: json.dumps(quant_info(qcfg, cfg))})
        models = {"bf16": model_from_params(cfg, tparams)}
        for fmt in ("tq2", "tq1"):
            write_packed(Path(tmp) / "ternary", Path(tmp) / fmt, fmt)
            models[fmt] = mcpm.from_pretrained(Path(tmp) / fmt)
        for label, model in models.items():
            ms = ms_per_token(model, n_short, n_long, args.repeats)
            rows.append({"model": label, "ms_per_token": ms,
                         "weight_bytes_per_token": weight_bytes(model)})
            print(f"{label}: {ms:.2f} ms/token", flush=True)
    base = rows[0]["weight_bytes_per_token"]
    for r in rows:
        r["bytes_vs_bf16"] = r["weight_bytes_per_token"] / base
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{jax.devices()[0].platform}, jax {jax.__version__}",
              "shape": shape, "batch": 1, "prompt": 8, "tokens": [n_short, n_long],
              "compute_dtype": "bfloat16", "rows": rows}
    write_json(args.out, result)
    print(f"\n{'model':6} {'ms/token':>9} {'weight MB/token':>16} {'vs bf16':>8}")
    for r in rows:
        print(f"{r['model']:6} {r['ms_per_token']:9.2f} {r['weight_bytes_per_token'] / 1e6:16.2f} "
              f"{r['bytes_vs_bf16']:8.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
