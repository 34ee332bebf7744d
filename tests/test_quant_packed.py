"""Packed ternary checkpoints (mcpm.quant.packed): exact round trip of q and scales, sizes, the
packed model (bytes unpacked one layer at a time in the scan) against the float ternary model,
generation, corrupt and truncated files, atomic writes."""
import json
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mcpm
import mcpm.quant.packed as packed_mod
from mcpm.api import load_params, model_from_params, params_of
from mcpm.checkpoint import save_checkpoint
from mcpm.config import QuantConfig
from mcpm.hf import CheckpointError
from mcpm.model.minicpm4 import PackedTernary, matrix_dims, param_shapes
from mcpm.quant.packed import PACKED_FILE, load_packed, write_packed
from mcpm.quant.qat import (HIDDEN_MATRICES, QUANT_FILE, quant_info, recover_ternary,
                            ternarize_params)

from test_quant_export import tiny_cfg


@pytest.fixture(scope="module")
def ternary(tmp_path_factory):
    """{group size: (checkpoint dir, cfg, ternary params)} for per-matrix and grouped scales."""
    root = tmp_path_factory.mktemp("ternary")
    cfg = tiny_cfg()
    params = params_of(mcpm.MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for g in (0, 16):
        qcfg = QuantConfig(method="ternary", group_size=g)
        tparams = ternarize_params(params, qcfg, cfg)
        (root / "tok").mkdir(exist_ok=True)
        (root / "tok" / "tokenizer.model").write_bytes(b"a tokenizer")
        save_checkpoint(root / f"g{g}", cfg, tparams, aux_dir=root / "tok",
                        extra_files={QUANT_FILE: json.dumps(quant_info(qcfg, cfg))})
        out[g] = (root / f"g{g}", cfg, tparams)
    return out


@pytest.fixture(scope="module")
def packed(ternary, tmp_path_factory):
    """{(group size, fmt): packed dir}."""
    root = tmp_path_factory.mktemp("packed")
    return {(g, fmt): Path(write_packed(ternary[g][0], root / f"g{g}-{fmt}", fmt)["out"])
            for g in ternary for fmt in ("tq2", "tq1")}


CASES = [(0, "tq2"), (0, "tq1"), (16, "tq2"), (16, "tq1")]


@pytest.mark.parametrize("g,fmt", CASES)
def test_round_trip_gives_back_q_and_scales_exactly(ternary, packed, g, fmt):
    _, cfg, tparams = ternary[g]
    ckpt = load_packed(packed[(g, fmt)])
    assert ckpt.packing.fmt == fmt and ckpt.packing.group_size == g
    assert ckpt.packing.names == HIDDEN_MATRICES
    for name in HIDDEN_MATRICES:
        shape = param_shapes(cfg)[name]
        k, n = matrix_dims(name, shape)
        q0, s0 = recover_ternary(tparams[name].reshape(shape[0], k, n), g)
        q, s = ckpt.ternary(name)
        assert q.dtype == np.int8 and s.dtype == np.float32
        np.testing.assert_array_equal(q, q0)
        np.testing.assert_array_equal(s, s0)
        assert s.shape == ((shape[0], k // g, n) if g else (shape[0], 1, 1))
    floats = ckpt.float_params()
    assert set(floats) == set(tparams)
    for name, w in tparams.items():   # unpacked q * scale is the ternary checkpoint's weight
        np.testing.assert_array_equal(floats[name], w, err_msg=name)
    # load_params reads a packed dir as the float ternary model
    _, _, loaded = load_params(packed[(g, fmt)])
    np.testing.assert_array_equal(loaded["q"], tparams["q"])
    assert (packed[(g, fmt)] / "tokenizer.model").read_bytes() == b"a tokenizer"


@pytest.mark.parametrize("fmt,least", [("tq2", 7.9), ("tq1", 9.7)])
def test_packed_matrices_are_8x_and_10x_smaller_than_bf16(ternary, tmp_path, fmt, least):
    # per-matrix scales: 4 bytes per matrix and layer on top of 2 or 1.6 bits per weight
    report = write_packed(ternary[0][0], tmp_path / "p", fmt)
    cfg = ternary[0][1]
    n_weights = sum(np.prod(param_shapes(cfg)[n]) for n in HIDDEN_MATRICES)
    assert report["bf16_bytes"] == 2 * n_weights
    assert report["ratio_vs_bf16"] >= least
    assert report["quantized_bytes"] == sum(
        a.nbytes for k, a in load_packed(tmp_path / "p").tensors.items() if "." in k)


@nnx.jit
def forward(model, ids):
    return model(ids)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("g,fmt", CASES)
def test_packed_model_equals_the_ternary_float_model(ternary, packed, g, fmt):
    _, cfg, tparams = ternary[g]
    model = mcpm.from_pretrained(packed[(g, fmt)])
    # the model holds bytes and scales, not float matrices
    assert not hasattr(model, "q") and isinstance(model.q_packed, PackedTernary)
    assert model.q_packed[...].dtype == jnp.uint8
    assert set(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == {
        "embed", "final_norm", "attn_norm", "mlp_norm"}
    ids = jnp.asarray(np.random.default_rng(g).integers(0, 256, (2, 24)), jnp.int32)
    got = np.asarray(forward(model, ids))
    want = np.asarray(forward(model_from_params(cfg, tparams), ids))
    # the same float32 weights (q * scale is exact) and the same ops: only the matmuls'
    # reduction order may differ, ~1e-7 per product over a reduction length of <= 128
    assert rel(got, want) < 1e-5


def test_packed_model_generates_the_ternary_models_tokens(ternary, packed):
    _, cfg, tparams = ternary[16]
    prompts = [[5, 17, 33, 9], [200, 3]]
    got = mcpm.generate(mcpm.from_pretrained(packed[(16, "tq1")]), prompts, 6, eos_token_id=-1)
    want = mcpm.generate(model_from_params(cfg, tparams), prompts, 6, eos_token_id=-1)
    assert [len(r) for r in got] == [10, 8]
    assert [r.tolist() for r in got] == [r.tolist() for r in want]


def _tensor_offset(path, name):
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    return 8 + hlen + header[name]["data_offsets"][0]


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_a_byte_that_no_ternary_matrix_packs_to_is_refused(packed, tmp_path, fmt):
    d = tmp_path / "p"
    shutil.copytree(packed[(0, fmt)], d)
    f = d / PACKED_FILE
    blob = bytearray(f.read_bytes())
    blob[_tensor_offset(f, "up.packed") + 70] = 0xFF     # tq2 code 3; tq1 > 242
    f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rf"corrupt {fmt} tensor up\.packed of "
                       rf"\S+weights\.safetensors: byte \(0, \d+, \d+\) \(value 255\).*export "
                       "the packed checkpoint again"):
        load_packed(d)


def test_a_truncated_file_is_refused_naming_the_tensors_cut_off(packed, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(packed[(0, "tq2")], d)
    f = d / PACKED_FILE
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: cannot read safetensors "
                       r"file: truncated, it holds \d+ "
                       r"bytes of tensor data but tensor\(s\) down\.packed, down\.scale reach "
                       r"beyond them .*export the packed checkpoint again"):
        mcpm.from_pretrained(d)


def test_a_tensor_of_the_wrong_shape_is_refused(packed, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(packed[(0, "tq2")], d)
    info = json.loads((d / QUANT_FILE).read_text())
    (d / QUANT_FILE).write_text(json.dumps({**info, "packing": "tq1"}))  # bytes are tq2 rows
    with pytest.raises(CheckpointError, match=r"metadata .* does not say format "
                                              r"'mcpm-packed-ternary', packing 'tq1'"):
        load_packed(d)
    (d / QUANT_FILE).write_text(json.dumps({**info, "group_size": 16}))
    with pytest.raises(CheckpointError, match=r"tensor q\.scale is \[2, 1, 1\] float32, "
                                              r"expected \[2, 4, 64\] float32"):
        load_packed(d)


def test_a_float_checkpoint_is_not_packed(tmp_path):
    cfg = tiny_cfg(num_hidden_layers=1)
    save_checkpoint(tmp_path / "f", cfg, params_of(mcpm.MiniCPM4(cfg, rngs=nnx.Rngs(1))))
    with pytest.raises(mcpm.UserError, match=r"is a float checkpoint \(it has no quant\.json\); "
                                             r".*mcpm quant ternarize"):
        write_packed(tmp_path / "f", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_and_keeps_an_old_out(ternary, tmp_path, monkeypatch):
    src = ternary[0][0]

    def fail(path, tensors, metadata=None):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(packed_mod, "write_safetensors", fail)
    with pytest.raises(OSError):
        write_packed(src, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        write_packed(src, tmp_path / "old")
    with pytest.raises(OSError):
        write_packed(src, tmp_path / "old", overwrite=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
