"""``mcpm quant ternarize`` and ``mcpm quant export``: make a ternary checkpoint from a float
one, and write a ternary checkpoint in the forms others read.

A ternary checkpoint is an mcpm checkpoint whose quantized matrices hold ``q * scale`` exactly
(float32) and whose ``quant.json`` names them (:mod:`mcpm.quant.qat`); a QAT run writes one,
:func:`ternarize_checkpoint` makes one after training. Exports:

* ``hf``: the BitCPM4 release form, the official HF layout with the ternary weights dequantized
  to bfloat16 (``q * bf16(scale)``, still exactly ternary per matrix or group) and a config.json
  with no quantization keys: any MiniCPM4 reader runs it as a float model.
* ``packed``: mcpm's packed checkpoint (:mod:`mcpm.quant.packed`), which
  :func:`mcpm.from_pretrained` runs from the ternary bytes.
* ``gguf``: one GGUF file for llama.cpp (:func:`mcpm.quant.gguf.export_gguf`).

Every output is written atomically: nothing at OUT on failure, an existing OUT refused unless
``overwrite`` and kept as it was when a replacement fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from mcpm.checkpoint import save_checkpoint
from mcpm.config import QuantConfig, group_size_problem
from mcpm.hf import check_output_dir, write_hf_checkpoint
from mcpm.quant.packed import require_ternary, write_packed
from mcpm.quant.qat import (QUANT_FILE, as_matrices, quant_info, quantized_names,
                            recover_ternary, ternarize_params)
from mcpm.quant.ternary import QuantError


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def ternarize_checkpoint(src: str | Path, out: str | Path, *, group_size: int = 0,
                         embeddings: bool = False, head: bool = False,
                         overwrite: bool = False) -> dict:
    """Absmean-ternarize the float checkpoint ``src`` (mcpm or HF directory) into the ternary
    checkpoint ``out`` (post-training quantization: q * scale in float32 plus quant.json).
    Refuses a checkpoint that already has a quant.json. Returns a report."""
    from mcpm.api import load_params

    src, out = Path(src), Path(out)
    check_output_dir(out, overwrite)
    if (src / QUANT_FILE).is_file():
        raise QuantError(
            f"{src / QUANT_FILE}: {src} is already a ternary checkpoint; quantizing a checkpoint "
            "twice would re-quantize its ternary weights (new scales from mean |q * scale|, "
            f"another model). Export it as it is (`mcpm quant export {src} OUT --format "
            "hf|packed|gguf`) or ternarize the float checkpoint it was made from")
    cfg, template, params = load_params(src)
    if head and cfg.tie_word_embeddings:
        raise QuantError(f"--head: {src} ties lm_head to the embedding (tie_word_embeddings); "
                         "pass --embeddings to ternarize the shared matrix")
    qcfg = QuantConfig(method="ternary", group_size=group_size, embeddings=embeddings,
                       head=head)
    names = quantized_names(qcfg, cfg)
    problem = group_size_problem(qcfg, cfg)
    if problem:
        raise QuantError(f"--group-size {group_size} {problem}, in {src}")
    tparams = ternarize_params(params, qcfg, cfg)
    del params
    zeros = sum(int(np.count_nonzero(tparams[n] == 0)) for n in names)
    total = sum(tparams[n].size for n in names)
    record = quant_info(qcfg, cfg)
    save_checkpoint(out, cfg, tparams, hf_config_template=template, aux_dir=src,
                    overwrite=overwrite,
                    extra_files={QUANT_FILE: json.dumps(record, indent=2) + "\n"})
    return {"out": str(out), "tensors": list(names), "group_size": group_size,
            "zero_fraction": zeros / total if total else 0.0, "total_bytes": _dir_bytes(out)}


def export_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """The BitCPM4 release form of the ternary checkpoint ``src``: official HF layout, every
    tensor in bfloat16 (the ternary ones as ``q * bf16(scale)``), config.json without
    quantization keys, tokenizer files copied. Returns a report."""
    from mcpm.api import load_params

    src, out = Path(src), Path(out)
    check_output_dir(out, overwrite)
    info = require_ternary(src)
    cfg, template, params = load_params(src)
    for name in info["tensors"]:   # refuses a checkpoint whose weights are not q * scale
        recover_ternary(np.asarray(as_matrices(name, params[name])), info["group_size"],
                        name=f"{src}: tensor {name}")
    for name in list(params):      # one tensor at a time: peak is the model plus one tensor
        params[name] = np.asarray(params[name]).astype(ml_dtypes.bfloat16)
    if template is not None:
        template = {k: v for k, v in template.items() if "quant" not in k.lower()}
        template["torch_dtype"] = "bfloat16"
    write_hf_checkpoint(params, cfg, out, hf_config_template=template, aux_dir=src,
                        overwrite=overwrite)
    return {"format": "hf", "out": str(out), "dtype": "bfloat16", "tensors": info["tensors"],
            "total_bytes": _dir_bytes(out)}


def export(src: str | Path, out: str | Path, fmt: str, *, packing: str = "tq2",
           overwrite: bool = False) -> dict:
    """Export the ternary checkpoint ``src`` as ``fmt`` ("hf", "packed" or "gguf")."""
    if fmt == "hf":
        return export_hf(src, out, overwrite=overwrite)
    if fmt == "packed":
        return write_packed(src, out, packing, overwrite=overwrite)
    if fmt == "gguf":
        from mcpm.quant.gguf import export_gguf
        return export_gguf(Path(src), Path(out), ternary_type=packing, overwrite=overwrite)
    raise QuantError(f"unknown export format {fmt!r}: use hf, packed or gguf")


def summary(report: dict) -> str:
    """The one line a command prints about what it wrote."""
    out = report.get("out", "")
    fmt = report.get("format")
    if fmt == "hf":
        return (f"wrote {out}: Hugging Face checkpoint, bfloat16, "
                f"{len(report['tensors'])} ternary tensors dequantized, "
                f"{human_bytes(report['total_bytes'])} in all")
    if fmt == "packed":
        return (f"wrote {out}: packed {report['packing']} checkpoint, "
                f"{human_bytes(report['total_bytes'])} in all; the {len(report['packed'])} ternary layer matrices take "
                f"{human_bytes(report['quantized_bytes'])} with scales vs "
                f"{human_bytes(report['bf16_bytes'])} in bfloat16 "
                f"({report['ratio_vs_bf16']:.1f}x smaller)")
    if fmt is None and "zero_fraction" in report:
        groups = (f"groups of {report['group_size']}" if report["group_size"]
                  else "one scale per matrix and layer")
        return (f"wrote {out}: ternary checkpoint ({', '.join(report['tensors'])}; {groups}; "
                f"{100 * report['zero_fraction']:.1f}% zeros), "
                f"{human_bytes(report['total_bytes'])}")
    size = next((report[k] for k in ("total_bytes", "bytes", "size_bytes", "file_bytes")
                 if isinstance(report.get(k), int)), None)
    where = out or report.get("path", "")
    return (f"wrote {where}: {fmt or 'gguf'}" + (f", {human_bytes(size)}" if size else "")
            + f" ({json.dumps({k: v for k, v in report.items() if k not in ('out', 'path')})})")


def ternarize_command(args) -> int:
    report = ternarize_checkpoint(args.checkpoint, args.out, group_size=args.group_size,
                                  embeddings=args.embeddings, head=args.head,
                                  overwrite=args.overwrite)
    print(summary(report))
    return 0


def export_command(args) -> int:
    report = export(args.checkpoint, args.out, args.format, packing=args.packing,
                    overwrite=args.overwrite)
    if args.format == "gguf":
        report = {"format": "gguf", "out": str(args.out), **(report or {})}
    print(summary(report))
    return 0
