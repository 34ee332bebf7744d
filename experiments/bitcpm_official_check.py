"""Does the official MiniCPM code run mcpm's ``--format hf`` ternary export (the BitCPM4 release
form) as mcpm runs the ternary model? (opt-in; needs the official code's stack: ``pip install
-e ".[official]"``).

    python experiments/bitcpm_official_check.py --official PATH/TO/models [--checkpoint CKPT]

``PATH/TO/models`` holds the official ``modeling_minicpm.py`` and ``configuration_minicpm.py``
(read at run time, never copied into this repository; see experiments/bench_official_cpu.py).
``CKPT`` is a ternary checkpoint (default ``runs/bitcpm-tiny/model`` from ``mcpm train
configs/bitcpm-tiny.yaml``). It is exported with ``mcpm quant export --format hf`` (bfloat16),
the official code loads the export in float32 and its logits on a prompt are compared with

* mcpm's ternary model (the checkpoint's float32 ``q * scale``): the difference is the export's
  bfloat16 rounding of the scales, embeddings and norms;
* mcpm's forward of the same export: the two implementations on identical weights.

Writes ``experiments/results/bitcpm_official_check.json`` and prints both comparisons.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

PROMPT = 'def parse_header(line):\n    """Split a "Key: value" header line."""\n'


def official_logits(models: Path, hf_dir: Path, ids: list[int], work: Path) -> np.ndarray:
    import torch

    from bench_official_cpu import load_official_model
    model = load_official_model(models, hf_dir, work)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got - want)
    return {"max_abs_error": float(diff.max()), "max_rel_error": float(diff.max() /
                                                                       np.abs(want).max()),
            "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True,
                    help="folder with the official modeling_minicpm.py and configuration_minicpm.py")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/bitcpm-tiny/model")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "experiments/results/bitcpm_official_check.json")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    import mcpm
    from mcpm._files import write_json
    from mcpm.api import load_params, model_from_params
    from mcpm.tokenizer import Tokenizer

    cfg, _, params = load_params(args.checkpoint)
    ids = Tokenizer(args.checkpoint, cfg.bos_token_id, cfg.eos_token_id).encode(PROMPT)
    ternary = np.asarray(model_from_params(cfg, params)(jnp.asarray([ids])))[0]
    with tempfile.TemporaryDirectory(prefix="bitcpm_official-") as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        subprocess.run([sys.executable, "-m", "mcpm.cli", "quant", "export",
                        str(args.checkpoint), str(hf), "--format", "hf"], check=True)
        mcpm_export = np.asarray(mcpm.from_pretrained(hf)(jnp.asarray([ids])))[0]
        official = official_logits(args.official, hf, ids, tmp)
    result = {"checkpoint": str(args.checkpoint), "tokens": len(ids),
              "official_vs_mcpm_ternary": compare(official, ternary),
              "official_vs_mcpm_same_export": compare(official, mcpm_export)}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
