"""Does llama.cpp run mcpm's GGUF exports as mcpm runs the checkpoint? (opt-in; needs
``pip install -e ".[llamacpp]"``).

A float checkpoint (``--checkpoint``; default ``runs/tiny/model`` from ``mcpm train
configs/tiny.yaml`` when it exists, else a random model with a small trained tokenizer) is
ternarized in process (absmean, one scale per matrix: what ``mcpm quant ternarize`` does) and
exported: the float model (F32, and F16), the ternary model as TQ2_0 and as TQ1_0, and as TQ2_0
two more ternarizations (with the embedding, so llama.cpp looks up TQ2_0 rows; with groups of
128 input rows, which the exporter writes as F16); a trained ternary checkpoint (``--qat``,
default ``runs/bitcpm-tiny/model`` from ``mcpm train configs/bitcpm-tiny.yaml``) is exported as
it is, as TQ2_0 and TQ1_0.
llama.cpp (llama-cpp-python) evaluates one prompt's token ids (mcpm's tokenizer, fed as ids so
both see the same tokens; whether llama.cpp's tokenizer gives the same ids is recorded) with
a float32 KV cache, and its logits at every position are compared
with mcpm's float32 forward of the matching model: max |difference|, that divided by the
largest |logit| of mcpm, and how often the top-1 tokens agree. When the shared fixtures of the
official PyTorch code are present, their HF directories are exported too (F32) and llama.cpp's
logits are compared with the official ones (LongRoPE, tied and untied heads).

Expected: the F32 file agrees to float32 rounding; F16 and the TQ files differ by what
llama.cpp's kernels do (F16 weights with F16 activations; TQ dot products take activations
quantized to 8 bits, Q8_K) plus the fp16 rounding of the ternary scales.

Writes ``experiments/results/llamacpp_check.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ('def parse_header(line):\n    """Split a "Key: value" header line."""\n'
          '    key, _, value = line.partition(":")\n'
          '    return key.strip().lower(), value.strip()\n')


def random_checkpoint(out: Path) -> Path:
    """A tiny random MiniCPM4 (hidden 256: TQ-sized rows) with a 512-piece tokenizer."""
    from flax import nnx

    from mcpm.api import params_of
    from mcpm.checkpoint import save_checkpoint
    from mcpm.config import ModelConfig
    from mcpm.data.builtin_corpus import stdlib_source_files
    from mcpm.model import MiniCPM4
    from mcpm.tokenizer import train_tokenizer

    tok = out.parent / "tokenizer"
    train_tokenizer(stdlib_source_files(limit=40), tok, vocab_size=512, max_sentences=20000)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=640,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      dim_model_base=64, max_position_embeddings=2048, eos_token_id=(2,))
    params = params_of(MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    save_checkpoint(out, cfg, params, aux_dir=tok)
    return out


def mcpm_logits(cfg, params, ids) -> np.ndarray:
    import jax.numpy as jnp

    from mcpm.api import model_from_params
    model = model_from_params(cfg, params)
    return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]


def llamacpp_logits(path: Path, rows: list[list[int]], threads: int) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each row of token ids (one context, reset
    between rows)."""
    import llama_cpp

    n = max(len(r) for r in rows)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, n), n_batch=n, n_ubatch=n,
                          logits_all=True, n_threads=threads, n_threads_batch=threads,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)
    try:
        out = []
        for ids in rows:
            llm.reset()
            llm.eval([int(i) for i in ids])
            out.append(np.array(llm.scores[:len(ids)], np.float64))
        return out
    finally:
        llm.close()


def llamacpp_tokens(path: Path, text: str) -> list[int]:
    """llama.cpp's token ids of ``text`` (with bos) from the file's vocabulary alone."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    finally:
        llm.close()


def official_cases(fixtures: Path, tmp: Path, threads: int) -> list[dict]:
    """The official PyTorch code's logits (shared fixtures: LongRoPE with the long factors
    and magnitude scale, or the short ones; tied and untied) against llama.cpp's, from the F32
    GGUF of each HF directory; the tokenizer is a small one trained here (ids are fed)."""
    from mcpm.quant.gguf import export_gguf
    from mcpm.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), rng.integers(2, 7))) for _ in range(200)]
    text = tmp / "official-text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(500)))
    out = []
    for case in sorted(p for p in fixtures.iterdir() if (p / "hf").is_dir()):
        hf = tmp / f"official-{case.name}"
        shutil.copytree(case / "hf", hf)
        train_tokenizer([text], hf, vocab_size=300)
        path = tmp / f"official-{case.name}.gguf"
        export_gguf(hf, path)
        ids, want = np.load(case / "ids.npy"), np.load(case / "logits.npy").astype(np.float64)
        got = np.stack(llamacpp_logits(path, list(ids), threads))
        out.append({"file": f"official/{case.name}", "bytes": path.stat().st_size,
                    "tokens": int(ids.size), **compare(got, want)})
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got - want)
    return {"max_abs_error": float(diff.max()),
            "max_rel_error": float(diff.max() / np.abs(want).max()),
            "mean_abs_error": float(diff.mean()),
            "max_abs_logit": float(np.abs(want).max()),
            "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="float mcpm checkpoint with a tokenizer.model (default: runs/tiny/model "
                         "when present, else a random tiny model)")
    ap.add_argument("--qat", type=Path, default=None,
                    help="a ternary QAT checkpoint (a `mcpm train` run's model/ under quant:) "
                         "exported as it is, as TQ2_0 and TQ1_0 (default: "
                         "runs/bitcpm-tiny/model when present)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--official", type=Path,
                    default=ROOT.parent / "shared/fixtures/official-minicpm4",
                    help="the official code's reference outputs (skipped when absent)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/llamacpp_check.json")
    args = ap.parse_args(argv)

    import llama_cpp

    from mcpm._files import write_json
    from mcpm.checkpoint import save_checkpoint
    from mcpm.config import QuantConfig
    from mcpm.api import load_params
    from mcpm.quant import qat
    from mcpm.quant.gguf import export_gguf
    from mcpm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="llamacpp_check-") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            tiny = ROOT / "runs/tiny/model"
            ckpt = tiny if tiny.is_dir() else random_checkpoint(tmp / "random")
        if qat.read_quant_info(ckpt) is not None:
            raise SystemExit(f"{ckpt} is already ternary: give the float checkpoint")
        cfg, _, params = load_params(ckpt)
        tok = Tokenizer(ckpt, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_id)
        ids = tok.encode(args.prompt)
        want_float = mcpm_logits(cfg, params, ids)

        def ternary(name: str, qcfg: QuantConfig):
            """(checkpoint, mcpm logits) of the model ternarized as ``qcfg`` says."""
            tparams = qat.ternarize_params(params, qcfg, cfg)
            save_checkpoint(tmp / name, cfg, tparams, aux_dir=ckpt, extra_files={
                qat.QUANT_FILE: json.dumps(qat.quant_info(qcfg, cfg))})
            return tmp / name, mcpm_logits(cfg, tparams, ids)

        tern, want_tern = ternary("ternary", QuantConfig(method="ternary"))
        float_vs_ternary = compare(want_tern, want_float)
        # the embedding (and so the tied head) ternary too: llama.cpp's row lookup of TQ2_0
        tern_emb, want_emb = ternary("ternary-emb", QuantConfig(method="ternary",
                                                                embeddings=True, head=True))
        # groups of 128 input rows: two scales per TQ block, so F16 matrices
        tern_g, want_g = ternary("ternary-g128", QuantConfig(method="ternary", group_size=128))

        runs = [("float-f32", ckpt, {"float_type": "f32"}, want_float),
                ("float-f16", ckpt, {"float_type": "f16"}, want_float),
                ("tq2", tern, {"ternary_type": "tq2"}, want_tern),
                ("tq1", tern, {"ternary_type": "tq1"}, want_tern),
                ("tq2, embedding ternary", tern_emb, {"ternary_type": "tq2"}, want_emb),
                ("tq2, group_size 128", tern_g, {"ternary_type": "tq2"}, want_g)]
        qat_ckpt = args.qat
        if qat_ckpt is None and (ROOT / "runs/bitcpm-tiny/model").is_dir():
            qat_ckpt = ROOT / "runs/bitcpm-tiny/model"
        if qat_ckpt is not None:   # trained ternary: its own weights, as a user would export them
            if qat.read_quant_info(qat_ckpt) is None:
                raise SystemExit(f"--qat {qat_ckpt}: not a ternary checkpoint (no quant.json)")
            qcfg, _, qparams = load_params(qat_ckpt)
            want_qat = mcpm_logits(qcfg, qparams, ids)
            runs += [(f"QAT {fmt}", qat_ckpt, {"ternary_type": fmt}, want_qat)
                     for fmt in ("tq2", "tq1")]
        rows = []
        for label, src, opts, want in runs:
            path = tmp / f"{label.replace(', ', '-').replace(' ', '_')}.gguf"
            t0 = time.perf_counter()
            report = export_gguf(src, path, **opts)
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = llamacpp_logits(path, [ids], args.threads)[0]
            t_eval = time.perf_counter() - t0
            if not rows:
                same_tokens = llamacpp_tokens(path, args.prompt) == list(ids)
            rows.append({"file": label, "bytes": report["bytes"],
                         "tensor_types": report["tensor_types"],
                         "fallbacks": [f["tensor"] for f in report["fallbacks"]],
                         "export_s": round(t_export, 3), "llamacpp_eval_s": round(t_eval, 3),
                         **compare(got, want)})
        official = (official_cases(args.official, tmp, args.threads)
                    if args.official.is_dir() else [])

    run = ckpt.parent / "summary.json"          # a `mcpm train` run's model/: how trained it is
    trained = ({k: v for k, v in json.loads(run.read_text()).items()
                if k in ("step", "loss", "eval_loss")} if run.is_file() else None)
    result = {"checkpoint": str(ckpt), "training": trained, "tokens": len(ids),
              "qat_checkpoint": None if qat_ckpt is None else str(qat_ckpt),
              "llamacpp_tokenizes_the_prompt_as_mcpm": same_tokens,
              "model": {k: getattr(cfg, k) for k in (
                  "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads")},
              "llama_cpp_python": llama_cpp.__version__,
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "threads": args.threads,
              "kv_cache": "F32",
              "mcpm_ternary_vs_float": float_vs_ternary, "files": rows,
              "official_vs_llamacpp": official}
    write_json(args.out, result)

    print(f"{ckpt}: {len(ids)} tokens (llama.cpp's tokenizer gives "
          f"{'the same' if same_tokens else 'OTHER'} ids); llama.cpp "
          f"(llama-cpp-python {llama_cpp.__version__}) vs mcpm logits")
    head = (f"{'file':28} {'MB':>7} {'max abs err':>12} {'max rel err':>12} "
            f"{'top-1 agree':>11}  fallbacks")
    print(head)
    print("-" * len(head))
    for r in rows + official:
        print(f"{r['file']:28} {r['bytes'] / 2**20:7.2f} {r['max_abs_error']:12.3e} "
              f"{r['max_rel_error']:12.3e} {r['top1_agreement']:11.3f}  "
              f"{len(r.get('fallbacks', []))}")
    if official:
        print("(official/*: llama.cpp vs the official PyTorch code's logits)")
    print(f"(mcpm ternary vs mcpm float: max rel {float_vs_ternary['max_rel_error']:.3e}, "
          f"top-1 agree {float_vs_ternary['top1_agreement']:.3f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
