"""The safetensors format, read and written one tensor at a time.

A file is a little-endian u64 header length, a JSON header (padded with spaces to 8 bytes)
giving every tensor's dtype, shape and byte range plus optional ``__metadata__`` (str -> str),
then the raw little-endian tensor data. Both Hugging Face checkpoints (mcpm.hf) and mcpm's
packed ternary checkpoints (mcpm.quant.packed) use this one reader and writer.

Why not the ``safetensors`` package: ``safetensors.safe_open`` memory-maps the file, and every
page it touches stays resident until the file is closed, which adds up to a second copy of a
large shard; ``safetensors.numpy.save_file`` serialises a whole file into one bytes object
first. Here a reader reads each tensor into a fresh array with a seek and a read, and the
writer asks its producers for one tensor at a time, so only one tensor is in flight.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from mcpm.config import UserError

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER = 100 * 2**20   # the limit the safetensors package itself enforces


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, malformed, or does not match its config.

    Defined with the file format so that the reader raises it without importing mcpm.hf
    (which re-exports it, as does mcpm)."""


class SafetensorsFile:
    """A safetensors file read with ordinary file reads, one tensor at a time.

    The header is checked against the file size on opening, so a truncated or corrupt file
    fails up front, naming the file and the tensors cut off, before anything is read.
    ``hint`` is the fix that ends every message about a damaged file (what produced the file
    knows how to make it again).
    """

    def __init__(self, path: str | Path, hint: str = "download or copy it again"):
        self.path = Path(path)
        self.hint = hint
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > min(size - 8, _MAX_HEADER):
                    raise ValueError(f"header length {hlen} does not fit the file ({size} bytes)")
                header = json.loads(f.read(hlen))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict):
                raise ValueError("__metadata__ is not a JSON object")
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e}); the file is "
                                  f"corrupt or truncated: {hint}") from None
        self.metadata: dict = metadata
        self._base, data_size = 8 + hlen, size - 8 - hlen
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            code = info.get("dtype") if isinstance(info, dict) else None
            if isinstance(code, str) and code not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {code}, which mcpm "
                                      f"does not read ({', '.join(SAFETENSORS_DTYPES)})")
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name} has a malformed header entry "
                                      f"{info}; {hint}") from None
            if start < 0 or end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name}: byte range {start}..{end} "
                                      f"does not hold shape {list(shape)} of {code}; {hint}")
            self._entries[name] = (dtype, shape, start, end)
        cut = sorted((n for n, e in self._entries.items() if e[3] > data_size),
                     key=lambda n: self._entries[n][2])
        if cut:
            listed = ", ".join(cut[:4]) + (f" and {len(cut) - 4} more" if len(cut) > 4 else "")
            raise CheckpointError(
                f"{self.path}: cannot read safetensors file: truncated, it holds {data_size} "
                f"bytes of tensor data but tensor(s) {listed} reach beyond them (up to byte "
                f"{max(self._entries[n][3] for n in cut)}); {hint}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor ``name``, from the header: nothing is read."""
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != end - start:  # shrunk since opened
                raise CheckpointError(f"{self.path}: tensor {name} is cut short; {self.hint}")
        return out


def write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], np.ndarray],
                                                      tuple[int, ...], np.dtype]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: ``(name, producer, shape, dtype)`` each.

    The header is written from the declared shapes and dtypes, then each producer is called
    in turn, so only one tensor is materialised at a time. ``metadata`` defaults to
    ``{"format": "pt"}``, what Hugging Face's own writer records.
    """
    assert sys.byteorder == "little", "safetensors is little-endian; big-endian hosts unsupported"
    header: dict = {"__metadata__": {"format": "pt"} if metadata is None else dict(metadata)}
    offset = 0
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
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} "
                                     f"{np.dtype(dtype)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # little-endian hosts
            del arr
