"""mcpm against the official PyTorch MiniCPM4 code on this CPU, measured in one run.

    pip install -e ".[official]"     # the official code's stack (torch 2.13.0 on this machine)
    python experiments/bench_official_cpu.py --official PATH/TO/models

``PATH/TO/models`` holds the official ``modeling_minicpm.py`` and ``configuration_minicpm.py``
(e.g. the ``models/`` folder of github.com/LDLINGLINGLING/ParetoQ_for_MiniCPM4, with its
``utils_quant.py``); it is read at run time and never copied into this repository.

Model: the ~126M MiniCPM4 shape (vocab 73448, hidden 768, 12 layers, 12 query / 2 kv heads,
MLP 1920), float32, random weights made by mcpm and written as an HF checkpoint that the
official code loads, so both run the same weights (their logits are compared).

Each framework runs in its own worker process (one framework's threads and memory never slow
the other's calls); the workers alternate for ``--rounds`` rounds and each reports the best of
two timed calls after a warm-up:

* forward: ``B x T`` tokens, no gradients (mcpm: ``jax.jit(model)``; official: ``model(ids)``
  under ``torch.no_grad()``, sdpa attention);
* train step: forward, next-token loss, backward, global-norm clipping and AdamW (mcpm: the
  trainer's step from ``build_train_program``, muP multipliers included; official: its
  ``labels=`` loss, ``clip_grad_norm_`` and ``torch.optim.AdamW``);
* the float32 matmul rate of each framework at the model's own MLP shape, for context.

Writes ``experiments/results/bench_official_cpu.md``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

SHAPE = ["model.vocab_size=73448", "model.hidden_size=768", "model.num_hidden_layers=12",
         "model.num_attention_heads=12", "model.num_key_value_heads=2",
         "model.intermediate_size=1920", "model.dim_model_base=256", "model.compute_dtype=float32",
         "model.param_dtype=float32", "model.max_position_embeddings=4096",
         "model.eos_token_id=[2]", "mesh.data=1"]


def best_of(fn, n: int = 2) -> float:
    fn()   # warm-up (and compile)
    out = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def mcpm_config(batch: int, seq: int):
    from mcpm.config import load_config
    return load_config(REPO / "configs" / "tiny.yaml",
                       SHAPE + [f"data.batch_size={batch}", f"data.seq_len={seq}"])




def worker_mcpm(work: Path, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import mcpm
    from mcpm.train.program import build_train_program

    from _report import synthetic_batch
    cfg = mcpm_config(batch, seq)
    host = synthetic_batch(cfg.model.vocab_size, batch, seq)
    model = mcpm.from_pretrained(work / "hf")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    x = jnp.asarray(host["inputs"])
    np.save(work / "mcpm_logits.npy", np.asarray(fwd(state, x[:1, :64])))
    out = {"forward_s": best_of(lambda: jax.block_until_ready(fwd(state, x)))}
    program = build_train_program(cfg)
    holder = {"state": program.init()}
    data = jax.device_put(host, program.batch_sharding)

    def step():
        holder["state"], metrics = program.step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])
    out["step_s"] = best_of(step)
    a = jnp.ones((batch * seq, cfg.model.hidden_size))
    b = jnp.ones((cfg.model.hidden_size, cfg.model.intermediate_size))
    mm = jax.jit(jnp.matmul)
    out["matmul_gflops"] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / 1e9 / best_of(
        lambda: jax.block_until_ready(mm(a, b)), 5)
    out["version"] = f"jax {jax.__version__}"
    return out


def load_official_model(models: Path, hf_dir: Path, work: Path):
    """The official code (``models``: its modeling/configuration files, copied as a package
    under ``work`` and imported from there) loading ``hf_dir`` in float32, sdpa attention."""
    import torch

    pkg = work / "official_minicpm"
    if not pkg.is_dir():
        pkg.mkdir()
        for name in ("modeling_minicpm.py", "configuration_minicpm.py", "utils_quant.py"):
            if (models / name).is_file():
                shutil.copy(models / name, pkg / name)
        (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(work))
    modeling = importlib.import_module("official_minicpm.modeling_minicpm")
    configuration = importlib.import_module("official_minicpm.configuration_minicpm")
    hf_cfg = configuration.MiniCPMConfig.from_pretrained(hf_dir)
    hf_cfg.w_bits = 16          # the vendored copy's QuantizeLinear is a plain linear at 16
    model = modeling.MiniCPMForCausalLM.from_pretrained(
        hf_dir, config=hf_cfg, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False   # its cache wants a Cache object; single calls need none
    return model


def worker_official(work: Path, models: Path, batch: int, seq: int) -> dict:
    import torch

    model = load_official_model(models, work / "hf", work)
    from _report import synthetic_batch
    cfg = mcpm_config(batch, seq)
    ids = torch.from_numpy(synthetic_batch(cfg.model.vocab_size, batch, seq)["inputs"]).long()
    model.eval()
    with torch.no_grad():
        np.save(work / "official_logits.npy", model(ids[:1, :64]).logits.numpy())

    def forward():
        with torch.no_grad():
            model(ids)
    out = {"forward_s": best_of(forward)}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["step_s"] = best_of(step)
    hf_cfg = model.config
    a = torch.ones(batch * seq, hf_cfg.hidden_size)
    b = torch.ones(hf_cfg.hidden_size, hf_cfg.intermediate_size)
    out["matmul_gflops"] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / 1e9 / best_of(
        lambda: a @ b, 5)
    out["version"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="folder with modeling_minicpm.py")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "experiments/results/bench_official_cpu.md"))
    ap.add_argument("--worker", nargs=2, metavar=("WHICH", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        which, work = args.worker[0], Path(args.worker[1])
        r = (worker_mcpm(work, args.batch, args.seq) if which == "mcpm" else
             worker_official(work, Path(args.official).resolve(), args.batch, args.seq))
        print(json.dumps(r))
        return 0

    models = Path(args.official)
    if not (models / "modeling_minicpm.py").is_file():
        sys.exit(f"--official {models}: no modeling_minicpm.py there")
    from flax import nnx

    import mcpm
    from _report import machine_info, write_report
    from mcpm.api import params_of
    from mcpm.hf import write_hf_checkpoint

    cfg = mcpm_config(args.batch, args.seq)
    work = Path(tempfile.mkdtemp(prefix="mcpm-official-"))
    results = {"mcpm": [], "official": []}
    try:
        write_hf_checkpoint(params_of(mcpm.MiniCPM4(cfg.model, rngs=nnx.Rngs(0))), cfg.model,
                            work / "hf")
        for _ in range(args.rounds):
            for which in ("mcpm", "official"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--official", str(models), "--batch",
                     str(args.batch), "--seq", str(args.seq), "--worker", which, str(work)],
                    capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{which} worker failed:\n{proc.stderr[-3000:]}")
                results[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(which, results[which][-1], flush=True)
        a = np.load(work / "mcpm_logits.npy").astype(np.float64)
        b = np.load(work / "official_logits.npy").astype(np.float64)
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fastest = {w: {k: min(r[k] for r in rs) for k in ("forward_s", "step_s")}
               for w, rs in results.items()}
    mm = {w: max(r["matmul_gflops"] for r in rs) for w, rs in results.items()}
    tok = args.batch * args.seq
    m, o = fastest["mcpm"], fastest["official"]
    info = machine_info()
    lines = [
        "# mcpm against the official PyTorch MiniCPM4 code on this CPU", "",
        f"{info['cpu']} x {info['nproc']}; {results['mcpm'][0]['version']}, "
        f"{results['official'][0]['version']}; float32; the ~126M shape "
        f"({cfg.model.num_params() / 1e6:.0f}M parameters), batch {args.batch} x {args.seq}; "
        f"each framework in its own process, alternating, {args.rounds} rounds, best time. "
        f"Same weights: logits relative difference {rel:.1e}.", "",
        "| | mcpm tokens/s | official tokens/s | mcpm / official |", "|---|---|---|---|",
        f"| forward | {tok / m['forward_s']:,.0f} | {tok / o['forward_s']:,.0f} | "
        f"{o['forward_s'] / m['forward_s']:.2f}x |",
        f"| train step | {tok / m['step_s']:,.0f} | {tok / o['step_s']:,.0f} | "
        f"{o['step_s'] / m['step_s']:.2f}x |",
        f"| float32 matmul [{tok}, {cfg.model.hidden_size}] x [{cfg.model.hidden_size}, "
        f"{cfg.model.intermediate_size}], GFLOP/s | {mm['mcpm']:.0f} | {mm['official']:.0f} | "
        f"{mm['mcpm'] / mm['official']:.2f}x |"]
    write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
