"""``mcpm quant ...``: ternary (BitCPM) checkpoints. Arguments are declared here; the work lives
in :mod:`mcpm.quant.export` (imported when a command runs, so ``mcpm --help`` stays fast)."""
from __future__ import annotations

import argparse

from mcpm.cli import non_negative_int


def _ternarize(args: argparse.Namespace) -> int:
    from mcpm.quant.export import ternarize_command
    return ternarize_command(args)


def _export(args: argparse.Namespace) -> int:
    from mcpm.quant.export import export_command
    return export_command(args)


def register(sub) -> None:
    """Add ``quant`` and its actions to the top-level subparsers ``sub``."""
    q = sub.add_parser("quant", help="ternary (BitCPM) checkpoints: post-training "
                                     "ternarization and export (HF, packed, GGUF)")
    qsub = q.add_subparsers(dest="action", required=True)

    t = qsub.add_parser("ternarize", help="float checkpoint (mcpm or HF) -> ternary mcpm "
                                          "checkpoint (absmean, post-training)")
    t.add_argument("checkpoint", help="mcpm checkpoint or HF directory of a float model")
    t.add_argument("out")
    t.add_argument("--group-size", type=non_negative_int, default=0,
                   help="rows of the input axis that share a scale (default 0: one scale per "
                        "matrix and layer); must divide every quantized matrix's input size")
    t.add_argument("--embeddings", action="store_true",
                   help="also ternarize the embedding (and so a tied head)")
    t.add_argument("--head", action="store_true", help="also ternarize an untied lm_head")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.set_defaults(func=_ternarize)

    e = qsub.add_parser("export", help="ternary checkpoint -> HF release (bf16), mcpm packed "
                                       "checkpoint, or GGUF")
    e.add_argument("checkpoint", help="ternary mcpm checkpoint (has quant.json)")
    e.add_argument("out")
    e.add_argument("--format", required=True, choices=("hf", "packed", "gguf"),
                   help="hf: official layout, dequantized weights in bfloat16; packed: mcpm's "
                        "packed checkpoint (ternary bytes + scales) for from_pretrained; gguf: "
                        "one .gguf file for llama.cpp")
    e.add_argument("--packing", choices=("tq2", "tq1"), default="tq2",
                   help="ternary byte format of packed and gguf: tq2 (2 bits per weight) or "
                        "tq1 (base 3, 1.6 bits per weight); default tq2")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_export)
