"""Official Hugging Face MiniCPM4 checkpoints <-> mcpm parameters, streaming, without torch.

Reading goes tensor by tensor (plain file reads, not mmap) from single-file or sharded
safetensors into preallocated layer-stacked numpy buffers (the source dtype is kept), so peak
memory is one copy of the model plus one tensor. Writing streams the safetensors format tensor by tensor for the same reason
(``safetensors.numpy.save_file`` serialises a whole file into one bytes object first).
Every problem is reported with the file and tensor it concerns, and nothing is written
half-done: outputs are assembled in a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from mcpm.config import ModelConfig, model_config_from_hf, model_config_to_hf
from mcpm.model.minicpm4 import param_shapes

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Files that travel with the weights through every conversion, unchanged.
AUX_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""


# --------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------

# mcpm layer parameter -> (HF name inside model.layers.{i}., kind of layout change)
_LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", "copy"),
    "mlp_norm": ("post_attention_layernorm.weight", "copy"),
    "q": ("self_attn.q_proj.weight", "in_heads"),
    "k": ("self_attn.k_proj.weight", "in_heads"),
    "v": ("self_attn.v_proj.weight", "in_heads"),
    "o": ("self_attn.o_proj.weight", "heads_out"),
    "gate": ("mlp.gate_proj.weight", "transpose"),
    "up": ("mlp.up_proj.weight", "transpose"),
    "down": ("mlp.down_proj.weight", "transpose"),
}
_GLOBAL_MAP = {"embed": ("model.embed_tokens.weight", "copy"),
               "final_norm": ("model.norm.weight", "copy"),
               "lm_head": ("lm_head.weight", "transpose")}


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, int | None, str, tuple[int, ...]]]:
    """HF tensor name -> (mcpm name, layer index or None, layout kind, HF shape)."""
    shapes = param_shapes(cfg)
    out = {}
    for name, (hf_name, kind) in _GLOBAL_MAP.items():
        if name in shapes:
            out[hf_name] = (name, None, kind, _hf_shape(shapes[name], kind))
    for i in range(cfg.num_hidden_layers):
        for name, (suffix, kind) in _LAYER_MAP.items():
            out[f"model.layers.{i}.{suffix}"] = (name, i, kind, _hf_shape(shapes[name][1:], kind))
    return out


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "copy":
        return shape
    if kind == "transpose":
        return shape[::-1]
    if kind == "in_heads":            # mcpm [H, N, D] <- HF [N*D, H]
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":           # mcpm [N, D, H] <- HF [H, N*D]
        return (shape[2], shape[0] * shape[1])
    raise AssertionError(kind)


def _to_mcpm(t: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return t
    return t.T.reshape(shape)


def _to_hf(t: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return np.ascontiguousarray(t)
    if kind == "transpose":
        return np.ascontiguousarray(t.T)
    if kind == "in_heads":
        return np.ascontiguousarray(t.reshape(t.shape[0], -1).T)
    if kind == "heads_out":
        return np.ascontiguousarray(t.reshape(-1, t.shape[-1]).T)
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            fpath = hf_dir / fname
            if not fpath.is_file():
                raise CheckpointError(f"{index} maps {name} to {fname}, which does not exist")
            files[name] = fpath
        return files
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).keys()}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise CheckpointError(f"{hf_dir}: only PyTorch pickle weights found; mcpm reads "
                              "safetensors. Re-save with save_pretrained(safe_serialization=True).")
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


class SafetensorsFile:
    """A safetensors file read with ordinary file reads, one tensor at a time.

    ``safetensors.safe_open`` memory-maps the file, and every page it touches stays resident
    until the file is closed, which adds up to a second copy of a large shard. Reading each
    tensor into a fresh array keeps only that tensor in flight. The header is checked against
    the file size, so truncated or corrupt files fail up front, naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {hlen} does not fit the file ({size} bytes)")
                header = json.loads(f.read(hlen))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e}); the file is "
                                  "corrupt or truncated: download or copy it again") from None
        header.pop("__metadata__", None)
        self._base, data_size = 8 + hlen, size - 8 - hlen
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name} has an unsupported or "
                                      f"malformed header entry {info}") from None
            if start < 0 or end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name}: offsets {start}..{end} do "
                                      f"not match shape {list(shape)} of {info['dtype']}")
            self._entries[name] = (dtype, shape, start, end)
            end_max = max(end_max, end)
        if end_max > data_size:
            raise CheckpointError(f"{self.path}: cannot read safetensors file: truncated, the "
                                  f"header describes {end_max} bytes of tensor data but the file "
                                  f"holds {data_size}; download or copy it again")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != end - start:
                raise CheckpointError(f"{self.path}: tensor {name} is cut short")
        return out


def iter_hf_tensors(hf_dir: str | Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, in the order given."""
    files = _weight_files(Path(hf_dir))
    readers: dict[Path, SafetensorsFile] = {}
    for name in names:
        path = files[name]
        if path not in readers:
            readers[path] = SafetensorsFile(path)
        if name not in readers[path].keys():
            raise CheckpointError(f"{path}: the index lists tensor {name} but the file lacks it")
        yield name, readers[path].get(name)


def read_hf_checkpoint(hf_dir: str | Path, dtype=None, progress: bool = False,
                       **run_options) -> tuple[ModelConfig, dict, dict[str, np.ndarray]]:
    """Read an official checkpoint: (config, the original config.json dict, params by mcpm name).

    ``dtype``: cast every tensor to this numpy dtype on the way (default: keep the file's).
    Fails, naming the tensor, on missing, unexpected or wrongly shaped tensors.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_config, source=str(hf_dir / "config.json"), **run_options)
    layout = hf_layout(cfg)
    files = _weight_files(hf_dir)
    expected, found = set(layout), set(files)
    extra = sorted(found - expected)
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in extra
    if tied_head:
        extra.remove("lm_head.weight")  # some exporters save the tied head too; checked below
    missing = sorted(expected - found)
    if missing or extra:
        hint = ""
        if "lm_head.weight" in missing:
            hint = " (config.json has tie_word_embeddings false; set it true if the head is tied)"
        raise CheckpointError(
            f"{hf_dir}: weights do not match config.json"
            + (f"; missing tensors: {_short(missing)}" if missing else "")
            + (f"; unexpected tensors: {_short(extra)}" if extra else "") + hint)

    params: dict[str, np.ndarray] = {}
    shapes = param_shapes(cfg)
    names = sorted(layout, key=_natural_key) + (["lm_head.weight"] if tied_head else [])
    it = iter_hf_tensors(hf_dir, names)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(names), desc=f"reading {hf_dir.name}", unit="tensor")
    for hf_name, tensor in it:
        if hf_name not in layout:  # the redundant tied head
            if not np.array_equal(tensor, params["embed"]):
                raise CheckpointError(f"{files[hf_name]}: lm_head.weight differs from "
                                      "model.embed_tokens.weight but config.json says "
                                      "tie_word_embeddings true; set it false")
            continue
        name, layer, kind, hf_shape = layout[hf_name]
        if tuple(tensor.shape) != hf_shape:
            raise CheckpointError(
                f"{files[hf_name]}: tensor {hf_name} has shape {list(tensor.shape)}, expected "
                f"{list(hf_shape)} from config.json (hidden_size {cfg.hidden_size}, heads "
                f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}, intermediate "
                f"{cfg.intermediate_size}, vocab {cfg.vocab_size})")
        if tensor.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"{files[hf_name]}: tensor {hf_name} has dtype {tensor.dtype}; "
                                  "expected a float type")
        out_dtype = np.dtype(dtype) if dtype is not None else tensor.dtype
        value = _to_mcpm(tensor, kind, shapes[name][1:] if layer is not None else shapes[name])
        if layer is None:
            params[name] = value.astype(out_dtype, copy=False)
        else:
            if name not in params:
                params[name] = np.empty(shapes[name], out_dtype)
            params[name][layer] = value
        del tensor, value
    return cfg, hf_config, params


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], np.ndarray],
                                                      tuple[int, ...], np.dtype]]) -> None:
    """Write a safetensors file tensor by tensor: ``(name, producer, shape, dtype)`` each.

    Only one tensor is materialised at a time. Format: little-endian u64 header length, the
    JSON header (padded with spaces to 8 bytes), then the raw little-endian data.
    """
    assert sys.byteorder == "little", "safetensors is little-endian; big-endian hosts unsupported"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, shape, dtype in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, produce, shape, dtype in tensors:
            arr = produce()
            if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # little-endian hosts
            del arr


def hf_tensor_plan(params: dict[str, np.ndarray], cfg: ModelConfig):
    """(HF name, producer, HF shape, dtype) for every tensor, in HF's natural order."""
    plan = []
    for hf_name, (name, layer, kind, hf_shape) in sorted(hf_layout(cfg).items(),
                                                          key=lambda kv: _natural_key(kv[0])):
        src = params[name]

        def produce(src=src, layer=layer, kind=kind):
            return _to_hf(src if layer is None else src[layer], kind)
        plan.append((hf_name, produce, hf_shape, np.dtype(src.dtype)))
    return plan


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def write_hf_checkpoint(params: dict[str, np.ndarray], cfg: ModelConfig, out_dir: str | Path,
                        hf_config_template: dict | None = None,
                        aux_dir: str | Path | None = None,
                        max_shard_size: str | int = "5GB", overwrite: bool = False,
                        progress: bool = False) -> Path:
    """Write an official-format checkpoint directory atomically: config.json, safetensors (with
    an index when sharded), and generation_config.json plus tokenizer files copied from
    ``aux_dir`` when it has them (a generation_config.json is made from the config otherwise)."""
    check_params(params, cfg)
    plan = hf_tensor_plan(params, cfg)
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[2])) * item[3].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    with atomic_output_dir(out_dir, overwrite) as tmp:
        hf_config = model_config_to_hf(cfg, hf_config_template)
        if hf_config_template is None:
            hf_config["torch_dtype"] = _torch_dtype_name(plan[0][3])
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id,
               "eos_token_id": (cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1
                                else list(cfg.eos_token_id))}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan), desc="writing safetensors", unit="tensor")
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            if bar is not None:
                shard = [(n, _counted(p, bar), s, d) for n, p, s, d in shard]
            write_safetensors(tmp / fname, shard)
            weight_map.update({name: fname for name, *_ in shard})
        if bar is not None:
            bar.close()
        if len(shards) > 1:
            total = sum(int(np.prod(s)) * d.itemsize for _, _, s, d in plan)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if aux_dir is not None:
            copy_aux_files(aux_dir, tmp)
    return Path(out_dir)


def _counted(produce, bar):
    def wrapped():
        out = produce()
        bar.update(1)
        return out
    return wrapped


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
            np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(np.dtype(dtype), "float32")


def check_params(params: dict[str, np.ndarray], cfg: ModelConfig, source: str = "params") -> None:
    """Every parameter present with the shape the config implies, nothing extra."""
    shapes = param_shapes(cfg)
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{source}: parameters do not match the config"
                              + (f"; missing: {missing}" if missing else "")
                              + (f"; unexpected: {extra}" if extra else ""))
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise CheckpointError(f"{source}: parameter {name} has shape "
                                  f"{list(params[name].shape)}, the config implies {list(shape)}")


def copy_aux_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer and generation-config files that ``src_dir`` has into ``dst_dir``."""
    copied = []
    for name in AUX_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dst_dir) / name)
            copied.append(name)
    return copied


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory beside ``out_dir``; rename it into place on success.

    An existing ``out_dir`` is refused unless ``overwrite``; on any error nothing is left behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another path or pass "
                              "--overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
