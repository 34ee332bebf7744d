"""The shared safetensors reader and writer: round trips, metadata, and damaged files."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from mcpm.safetensors_file import CheckpointError, SafetensorsFile, write_safetensors


def _arrays():
    rng = np.random.default_rng(0)
    return {"a": rng.integers(0, 255, (3, 5), dtype=np.uint8),
            "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
            "c": rng.standard_normal((2, 2)).astype(np.float32),
            "d": np.arange(6, dtype=np.int64).reshape(2, 3)}


def _write(path, arrays, metadata=None):
    write_safetensors(path, [(k, lambda v=v: v, v.shape, v.dtype) for k, v in arrays.items()],
                      metadata)


def test_round_trip_with_metadata_and_specs(tmp_path):
    arrays = _arrays()
    _write(tmp_path / "x.safetensors", arrays, {"format": "mine", "k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.keys() == list(arrays) and f.metadata == {"format": "mine", "k": "v"}
    for k, v in arrays.items():
        assert f.spec(k) == (v.dtype, v.shape)
        got = f.get(k)
        assert got.dtype == v.dtype and np.array_equal(got.view(np.uint8), v.view(np.uint8))
    with safe_open(str(tmp_path / "x.safetensors"), "np") as st:   # the reference reader
        assert st.metadata() == {"format": "mine", "k": "v"}
        assert np.array_equal(st.get_tensor("a"), arrays["a"])


def test_default_metadata_is_hugging_faces(tmp_path):
    _write(tmp_path / "x.safetensors", {"c": np.ones(2, np.float32)})
    assert SafetensorsFile(tmp_path / "x.safetensors").metadata == {"format": "pt"}


def test_a_truncated_file_names_the_tensors_cut_off_and_the_fix(tmp_path):
    arrays = {f"t{i}": np.full(4, i, np.float32) for i in range(8)}
    f = tmp_path / "x.safetensors"
    _write(f, arrays)
    f.write_bytes(f.read_bytes()[:-16 * 6 - 1])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: cannot read safetensors file: "
                       r"truncated, it holds 31 bytes of tensor data but tensor\(s\) t1, t2, "
                       r"t3, t4 and 3 more reach beyond them \(up to byte 128\); make it again$"):
        SafetensorsFile(f, hint="make it again")


def test_garbage_and_unsupported_dtypes_are_named(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: cannot read safetensors file "
                       r"\(.*\); the file is corrupt or truncated: fix it$"):
        SafetensorsFile(f, hint="fix it")
    header = json.dumps({"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00")
    with pytest.raises(CheckpointError, match=r"tensor w has dtype I8, which mcpm does not read"):
        SafetensorsFile(f)
