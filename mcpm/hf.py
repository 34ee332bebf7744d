"""Official Hugging Face MiniCPM4 checkpoints <-> mcpm parameters, streaming, without torch.

Reading goes tensor by tensor (plain file reads, not mmap: see mcpm.safetensors_file) from
single-file or sharded safetensors into preallocated layer-stacked numpy buffers (the source
dtype is kept), so peak memory is one copy of the model plus one tensor. Writing streams the
safetensors format tensor by tensor for the same reason.
Every problem is reported with the file and tensor it concerns, and nothing is written
half-done: outputs are assembled in a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from mcpm.config import ModelConfig, UserError, model_config_from_hf, model_config_to_hf
from mcpm.model.minicpm4 import param_shapes
from mcpm.safetensors_file import CheckpointError, SafetensorsFile, write_safetensors

# The fix that ends the message about a damaged safetensors file of a Hugging Face checkpoint.
_REFETCH = "download or copy it again"

# Files that travel with the weights through every conversion, unchanged.
AUX_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class SizeError(UserError, ValueError):
    """A size such as ``--max-shard-size`` that is not a positive number of bytes."""


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
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise CheckpointError(f"{hf_dir} does not exist; give the directory of a Hugging Face "
                              "model (config.json + model.safetensors)")
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is a file, not a directory; give the directory of a "
                              "Hugging Face model (config.json + model.safetensors)")
    path = hf_dir / "config.json"
    if not path.is_file():
        hint = ("; it is an mcpm checkpoint: `mcpm convert to-hf` exports it"
                if (hf_dir / "model.yaml").is_file() else
                "; is this a Hugging Face model directory?")
        raise CheckpointError(f"{hf_dir}: no config.json{hint}")
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
        return {name: single for name in SafetensorsFile(single, _REFETCH).keys()}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise CheckpointError(f"{hf_dir}: only PyTorch pickle weights found; mcpm reads "
                              "safetensors. Re-save with save_pretrained(safe_serialization=True).")
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def iter_hf_tensors(hf_dir: str | Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, in the order given."""
    files = _weight_files(Path(hf_dir))
    readers: dict[Path, SafetensorsFile] = {}
    for name in names:
        path = files[name]
        if path not in readers:
            readers[path] = SafetensorsFile(path, _REFETCH)
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
    nonfinite: dict[Path, list[tuple[str, int, int]]] = {}
    shapes = param_shapes(cfg)
    names = sorted(layout, key=_natural_key) + (["lm_head.weight"] if tied_head else [])
    bar = None
    it = iter_hf_tensors(hf_dir, names)
    if progress:
        from tqdm import tqdm
        it = bar = tqdm(it, total=len(names), desc=f"reading {hf_dir.name}", unit="tensor")
    try:
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
            if tensor.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{files[hf_name]}: tensor {hf_name} has dtype "
                                      f"{tensor.dtype}; expected a float type")
            bad = count_nonfinite(tensor)
            if bad:
                nonfinite.setdefault(files[hf_name], []).append((hf_name, bad, tensor.size))
            out_dtype = np.dtype(dtype) if dtype is not None else tensor.dtype
            value = _to_mcpm(tensor, kind, shapes[name][1:] if layer is not None else shapes[name])
            if layer is None:
                params[name] = value.astype(out_dtype, copy=False)
            else:
                if name not in params:
                    params[name] = np.empty(shapes[name], out_dtype)
                params[name][layer] = value
            del tensor, value
    finally:  # closed before an error is reported, not under its message
        if bar is not None:
            bar.close()
    for path, found in nonfinite.items():
        warn_nonfinite(str(path), found)
    return cfg, hf_config, params


def count_nonfinite(a: np.ndarray, chunk: int = 1 << 22) -> int:
    """The number of NaN and Inf values in ``a``, without a full-size temporary: a finite sum
    proves there are none (NaN and Inf propagate); only otherwise are they counted, by chunks."""
    if a.dtype not in _FLOAT_DTYPES or a.size == 0:
        return 0
    flat = a.reshape(-1)
    acc = np.float64 if a.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(flat, dtype=acc)):
            return 0
    return sum(int(part.size - np.count_nonzero(np.isfinite(part)))
               for part in (flat[i:i + chunk] for i in range(0, flat.size, chunk)))


_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                 np.dtype(ml_dtypes.bfloat16)}


def warn_nonfinite(source: str, found: list[tuple[str, int, int]]) -> None:
    """Warn that the tensors ``(name, non-finite count, size)`` of ``source`` hold NaN or Inf."""
    listed = ", ".join(f"{name} ({bad} of {size})" for name, bad, size in found[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    warnings.warn(f"{source}: {len(found)} tensor(s) hold NaN or Inf values: {listed}{more}; "
                  "they are kept as they are, but a model with them produces NaN: check where "
                  "these weights come from", UserWarning, stacklevel=3)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

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


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
               "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"``; anything else is a
    :class:`SizeError` naming ``what``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip().upper()
        number, mult = t, 1
        for unit, m in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(unit):
                number, mult = t[: -len(unit)].strip(), m
                break
        try:
            value = int(float(number) * mult)
        except (ValueError, OverflowError):
            raise SizeError(f"{what} {text!r} is not a size: write a number with an optional "
                            "unit, e.g. 5GB, 500MB, 2GiB or 1000000 (bytes)") from None
    if value <= 0:
        raise SizeError(f"{what} {text!r} must be positive, e.g. 5GB")
    return value


def write_hf_checkpoint(params: dict[str, np.ndarray], cfg: ModelConfig, out_dir: str | Path,
                        hf_config_template: dict | None = None,
                        aux_dir: str | Path | None = None,
                        max_shard_size: str | int = "5GB", overwrite: bool = False,
                        progress: bool = False) -> Path:
    """Write an official-format checkpoint directory atomically: config.json, safetensors (with
    an index when sharded), and generation_config.json plus tokenizer files copied from
    ``aux_dir`` when it has them (a generation_config.json is made from the config otherwise)."""
    check_params(params, cfg)
    limit = parse_size(max_shard_size, "max_shard_size")
    check_output_dir(out_dir, overwrite)
    plan = hf_tensor_plan(params, cfg)
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
        try:
            for k, shard in enumerate(shards):
                fname = ("model.safetensors" if len(shards) == 1
                         else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
                if bar is not None:
                    shard = [(n, _counted(p, bar), s, d) for n, p, s, d in shard]
                write_safetensors(tmp / fname, shard)
                weight_map.update({name: fname for name, *_ in shard})
        finally:  # closed before an error is reported, not under its message
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


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite``: commands call this before any slow
    reading, so that a refusal costs nothing."""
    out_dir = Path(out_dir)
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another path or pass "
                              "--overwrite (overwrite=True) to replace it")
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FileExistsError(f"cannot write {out_dir}: {parent} is a file, not a directory; "
                              "choose another path")


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory beside ``out_dir``; rename it into place on success.

    An existing ``out_dir`` is refused unless ``overwrite``. On any error or interruption
    nothing is left behind: not the temporary directory, not the parent directories made for
    it, and an ``out_dir`` being replaced stays as it was.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # deepest first; stops at one that holds something
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _replace(new: Path, out_dir: Path) -> None:
    """Rename ``new`` to ``out_dir``. An existing ``out_dir`` is moved into a fresh hidden
    directory first and put back if the rename fails, then deleted; if it cannot be deleted,
    a warning says where it is."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        new.rename(out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old = trash / out_dir.name
    try:
        out_dir.rename(old)
    except BaseException:
        trash.rmdir()
        raise
    try:
        new.rename(out_dir)
    except BaseException:
        try:
            old.rename(out_dir)
            trash.rmdir()
        except OSError as e:
            warnings.warn(f"could not put the previous {out_dir} back ({e}): it is at {old}",
                          UserWarning, stacklevel=4)
        raise
    try:
        shutil.rmtree(trash, ignore_errors=True)
    except KeyboardInterrupt:  # the new output is in place: finish the clean-up, then stop
        shutil.rmtree(trash, ignore_errors=True)
        raise
    if trash.exists():
        warnings.warn(f"replaced {out_dir}, but the previous one could not be deleted: what is "
                      f"left of it is in {trash}; delete it by hand", UserWarning, stacklevel=4)
