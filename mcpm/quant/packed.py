"""mcpm's packed ternary checkpoint: the layer matrices as ternary bytes plus scales, for
inference from a fraction of the bytes (``mcpm quant export CKPT OUT --format packed``).

Layout of a directory written by :func:`write_packed`::

    model.yaml           the ModelConfig (as in an mcpm checkpoint)
    quant.json           the ternary record (mcpm.quant.qat.quant_info) plus "packing": "tq2" or
                         "tq1" and "packed": the layer matrices stored as bytes
    weights.safetensors  every tensor (below), one safetensors file
    hf_config.json       the config.json the weights came with, if the source had one
    tokenizer.model      ... and the other tokenizer files and generation_config.json, if any

Tensors, by name:

* ``NAME.packed`` uint8 ``[L, R, out]`` for each packed layer matrix NAME (q, k, v, o, gate,
  up, down): the row-planar bytes (:func:`mcpm.quant.pack.pack_rows`, format ``packing``) of
  its ``[L, in, out]`` matrix view (:func:`mcpm.quant.qat.as_matrices`), R = ceil(in / 4) for
  tq2 and ceil(in / 5) for tq1;
* ``NAME.scale`` float32 ``[L, 1, 1]`` (group_size 0) or ``[L, in / g, out]``: q * scale is the
  ternary checkpoint's weight exactly;
* every other parameter under its mcpm name, in the dtype the source checkpoint holds it
  (float32 from a training run). A ternary embedding or lm_head stays there as its exact float
  ``q * scale``: the embedding is read by row gathers and the head is not inside the layer scan
  that unpacks one layer at a time.

Why one safetensors file: its header gives every tensor's dtype, shape and byte range, so a
reader checks the whole file against its size before reading anything (a truncated file fails
up front, naming the tensors cut off) and then reads one tensor at a time with a seek and a
read (no second copy, no memory map; mcpm.safetensors_file); any safetensors reader opens it
(U8, F32, BF16, F16).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import yaml

from mcpm.checkpoint import HF_TEMPLATE, MODEL_YAML, load_model_config, read_hf_template
from mcpm.config import ModelConfig, to_dict
from mcpm.hf import CheckpointError, atomic_output_dir, check_output_dir, copy_aux_files
from mcpm.model.minicpm4 import DTYPES, MiniCPM4, Packing, matrix_dims, param_shapes
from mcpm.quant.pack import FORMATS, check_rows, pack_rows, packed_rows, unpack_rows
from mcpm.quant.qat import HIDDEN_MATRICES, QUANT_FILE, read_quant_info, recover_ternary
from mcpm.quant.ternary import QuantError
from mcpm.safetensors_file import SafetensorsFile, write_safetensors

PACKED_FILE = "weights.safetensors"
FORMAT_TAG = "mcpm-packed-ternary"

# The dtypes a parameter that is not packed is stored in (others are written as float32).
_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}
# The fix that ends the message about a damaged weights file.
_REEXPORT = "export the packed checkpoint again"


def is_packed_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_YAML).is_file() and (path / PACKED_FILE).is_file()


def require_ternary(ckpt_dir: str | Path) -> dict:
    """The quant.json of a ternary checkpoint; a float one is refused with what to do."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir} does not exist; give a ternary mcpm checkpoint "
                              f"directory (model.yaml, params/ and {QUANT_FILE})")
    info = read_quant_info(ckpt_dir)
    if info is None:
        raise QuantError(f"{ckpt_dir} is a float checkpoint (it has no {QUANT_FILE}); exports "
                         "are of ternary models: make one with `mcpm quant ternarize "
                         f"{ckpt_dir} OUT` (post-training) or train with quant.method=ternary, "
                         "then export that checkpoint")
    return info


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def packed_layout(cfg: ModelConfig, packing: Packing) -> dict[str, tuple[tuple[int, ...],
                                                                        np.dtype | None]]:
    """File tensor name -> (shape, dtype) of a packed checkpoint (dtype None: any float)."""
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name not in packing.names:
            out[name] = (shape, None)
            continue
        k, n = matrix_dims(name, shape)
        g = packing.group_size
        out[f"{name}.packed"] = ((shape[0], packed_rows(k, packing.fmt), n), np.dtype(np.uint8))
        out[f"{name}.scale"] = ((shape[0], k // g, n) if g else (shape[0], 1, 1),
                                np.dtype(np.float32))
    return out


def write_packed(src: str | Path, out: str | Path, fmt: str = "tq2",
                 overwrite: bool = False) -> dict:
    """Write the packed checkpoint of the ternary checkpoint ``src`` to ``out`` atomically
    (nothing is left at ``out`` on failure; an existing ``out`` is refused unless
    ``overwrite``, and kept as it was if the export fails). Returns a report with the sizes:
    ``quantized_bytes`` (bytes and scales of the packed matrices), ``bf16_bytes`` (the same
    matrices in bfloat16), ``total_bytes`` (the directory)."""
    from mcpm.api import load_params

    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise QuantError(f"unknown packing {fmt!r}: use 'tq2' (2 bits per weight) or 'tq1' "
                         "(base 3, 1.6 bits per weight)")
    check_output_dir(out, overwrite)
    info = require_ternary(src)
    cfg, template, params = load_params(src)
    g = info["group_size"]
    names = tuple(n for n in HIDDEN_MATRICES if n in info["tensors"])
    # every matrix is recovered and packed before anything is written: a checkpoint that is
    # not ternary fails here, naming the tensor
    tensors: dict[str, np.ndarray] = {}
    quantized = bf16 = 0
    for name, shape in param_shapes(cfg).items():
        w = np.asarray(params.pop(name))
        if name not in names:
            tensors[name] = w if w.dtype in _FLOATS else w.astype(np.float32)
            continue
        k, n = matrix_dims(name, shape)
        q, scale = recover_ternary(w.reshape(shape[0], k, n), g,
                                   name=f"{src}: tensor {name}")
        tensors[f"{name}.packed"] = pack_rows(q, fmt)
        tensors[f"{name}.scale"] = scale
        quantized += tensors[f"{name}.packed"].nbytes + scale.nbytes
        bf16 += 2 * q.size
        del w, q
    record = {**info, "packing": fmt, "packed": list(names)}
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / MODEL_YAML).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (tmp / QUANT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if template is not None:
            (tmp / HF_TEMPLATE).write_text(json.dumps(template, indent=2) + "\n")
        write_safetensors(tmp / PACKED_FILE,
                          [(name, lambda a=a: a, a.shape, a.dtype) for name, a in tensors.items()],
                          metadata={"format": FORMAT_TAG, "packing": fmt})
        copy_aux_files(src, tmp)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"format": "packed", "packing": fmt, "out": str(out), "packed": list(names),
            "quantized_bytes": quantized, "bf16_bytes": bf16, "total_bytes": total,
            "ratio_vs_bf16": bf16 / quantized if quantized else None}


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

class PackedCheckpoint(NamedTuple):
    """A packed checkpoint in host memory: ``tensors`` by their file names (see the module
    docstring), checked against the config and the packing."""

    cfg: ModelConfig
    template: dict | None
    info: dict
    packing: Packing
    tensors: dict[str, np.ndarray]

    def ternary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(q int8 ``[L, in, out]``, scale float32) of the packed matrix ``name``."""
        k, _ = matrix_dims(name, param_shapes(self.cfg)[name])
        q = unpack_rows(self.tensors[f"{name}.packed"], k, self.packing.fmt)
        return np.asarray(q), self.tensors[f"{name}.scale"]

    def float_params(self) -> dict[str, np.ndarray]:
        """The ternary model's parameters by mcpm name, packed matrices as float32 q * scale
        (what the ternary checkpoint held)."""
        out = {}
        for name, shape in param_shapes(self.cfg).items():
            if name not in self.packing.names:
                out[name] = self.tensors[name]
                continue
            q, scale = self.ternary(name)
            groups = scale.shape[-2]
            w = q.reshape(shape[0], groups, -1, q.shape[-1]).astype(np.float32)
            out[name] = (w * scale[:, :, None, :]).reshape(shape)
        return out


def load_packed(path: str | Path, **run_options) -> PackedCheckpoint:
    """Read and check a packed checkpoint directory: every tensor present with its shape and
    dtype, nothing extra, every byte a packed ternary value, every scale finite and >= 0.
    ``run_options`` override run-time model keys (e.g. ``compute_dtype``)."""
    path = Path(path)
    if not is_packed_checkpoint(path):
        raise CheckpointError(f"{path} is not a packed checkpoint (needs {MODEL_YAML} and "
                              f"{PACKED_FILE}); `mcpm quant export CKPT OUT --format packed` "
                              "writes one")
    cfg = load_model_config(path, **run_options)
    info = read_quant_info(path)
    fmt = (info or {}).get("packing")
    names = (info or {}).get("packed")
    if info is None or fmt not in FORMATS or not isinstance(names, list) or not set(
            names) <= set(HIDDEN_MATRICES):
        raise CheckpointError(f"{path / QUANT_FILE}: missing or not a packed checkpoint's record "
                              "(needs \"packing\": \"tq2\" or \"tq1\" and \"packed\": the packed "
                              "layer matrices); export the checkpoint again")
    template = read_hf_template(path)
    packing = Packing(fmt, tuple(names), info["group_size"])
    file = path / PACKED_FILE
    if packing.group_size:
        for name in packing.names:
            k, _ = matrix_dims(name, param_shapes(cfg)[name])
            if k % packing.group_size:
                raise CheckpointError(f"{path / QUANT_FILE}: group_size {packing.group_size} "
                                      f"does not divide the input size {k} of {name}")
    layout = packed_layout(cfg, packing)
    reader = SafetensorsFile(file, _REEXPORT)
    if reader.metadata.get("format") != FORMAT_TAG or reader.metadata.get("packing") != fmt:
        raise CheckpointError(f"{file}: its metadata {reader.metadata} does not say "
                              f"format {FORMAT_TAG!r}, packing {fmt!r} (as {QUANT_FILE} does); "
                              "export the packed checkpoint again")
    missing = sorted(set(layout) - set(reader.keys()))
    extra = sorted(set(reader.keys()) - set(layout))
    if missing or extra:
        raise CheckpointError(f"{file}: tensors do not match model.yaml and {QUANT_FILE}"
                              + (f"; missing: {missing}" if missing else "")
                              + (f"; unexpected: {extra}" if extra else ""))
    tensors = {}
    for name, (shape, dtype) in layout.items():
        got_dtype, got_shape = reader.spec(name)
        if got_shape != tuple(shape) or (dtype is not None and got_dtype != dtype) or (
                dtype is None and got_dtype not in _FLOATS):
            raise CheckpointError(f"{file}: tensor {name} is {list(got_shape)} {got_dtype}, "
                                  f"expected {list(shape)} {dtype or 'float'} from model.yaml "
                                  f"and {QUANT_FILE}")
        a = reader.get(name)
        if name.endswith(".packed"):
            try:
                check_rows(a, fmt, what=f"tensor {name} of {file}")
            except QuantError as e:
                raise CheckpointError(f"{e}; the file is damaged: export the packed "
                                      "checkpoint again") from None
        elif name.endswith(".scale") and not (np.all(np.isfinite(a)) and np.all(a >= 0)):
            raise CheckpointError(f"{file}: tensor {name} holds negative or non-finite scales; "
                                  "the file is damaged: export the packed checkpoint again")
        tensors[name] = a
    return PackedCheckpoint(cfg, template, info, packing, tensors)


def packed_model(ckpt: PackedCheckpoint):
    """A MiniCPM4 that holds the packed matrices as bytes and scales (unpacked one layer at a
    time in its forward pass) and the other parameters in ``cfg.param_dtype``."""
    import jax.numpy as jnp
    from flax import nnx

    cfg, packing = ckpt.cfg, ckpt.packing
    abstract = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0), packing=packing))
    graphdef, state = nnx.split(abstract)
    dtype = DTYPES[cfg.param_dtype]
    pure = {}
    for name in param_shapes(cfg):
        if name in packing.names:
            pure[f"{name}_packed"] = jnp.asarray(ckpt.tensors[f"{name}.packed"])
            pure[f"{name}_scale"] = jnp.asarray(ckpt.tensors[f"{name}.scale"])
        else:
            pure[name] = jnp.asarray(ckpt.tensors[name], dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)



def lower_packed_decode(cfg: ModelConfig, packing: Packing, batch: int, cache_len: int,
                        sharding):
    """The decode step (one new token over a ``cache_len``-slot KV cache) of a packed model,
    lowered without weights under the activation hints of ``sharding``: with a TPU slice's
    sharding it is the TPU program (Pallas kernels included) whatever this host is, as
    ``mcpm aot`` traces."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mcpm.model.minicpm4 import KVCache
    from mcpm.model.sharding_hints import activation_sharding
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0), packing=packing)))
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, cache_len))

    def decode(state, ids, cache):
        with activation_sharding(lambda axes, shape: sharding):
            return nnx.merge(graphdef, state)(ids, cache=cache)
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    return jax.jit(decode, in_shardings=sharding, donate_argnums=2).trace(
        state, ids, cache).lower()
