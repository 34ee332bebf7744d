"""Official checkpoint interop: exact round trips, sharding, dtypes, and every kind of bad input."""
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import mcpm
from mcpm.checkpoint import load_checkpoint, save_checkpoint
from mcpm.cli import main as cli
from mcpm.config import ModelConfig
from mcpm.hf import (CheckpointError, read_hf_checkpoint, write_hf_checkpoint,
                     write_safetensors)
from mcpm.model.minicpm4 import param_shapes


def read_all(hf_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def assert_bit_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                dim_model_base=8, eos_token_id=(2,))
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg: ModelConfig, dtype=np.float32, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(cfg).items()}


def test_round_trip_through_mcpm_checkpoint_is_bit_exact(official_case, tmp_path):
    src = official_case / "hf"
    assert cli(["convert", "from-hf", str(src), str(tmp_path / "ck")]) == 0
    assert cli(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert_bit_equal(read_all(src), read_all(tmp_path / "hf"))
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text()) == json.loads((src / name).read_text())
    # and the export reproduces the official logits
    ids = np.load(official_case / "ids.npy").astype(np.int32)
    ref = np.load(official_case / "logits.npy")
    out = np.asarray(mcpm.from_pretrained(tmp_path / "hf")(ids))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-6


def test_sharded_bfloat16_round_trip(tmp_path):
    cfg = small_cfg(tie_word_embeddings=False)
    params = random_params(cfg, ml_dtypes.bfloat16)
    write_hf_checkpoint(params, cfg, tmp_path / "hf", max_shard_size="5KB")
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    cfg2, _, back = read_hf_checkpoint(tmp_path / "hf")
    assert cfg2 == cfg
    assert all(back[k].dtype == ml_dtypes.bfloat16 for k in back)
    assert_bit_equal(params, back)
    # from_pretrained casts to float32 parameters
    model = mcpm.from_pretrained(tmp_path / "hf")
    assert model.q[...].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(model.q[...]), params["q"].astype(np.float32))


def test_hf_layout_matches_torch_linear_convention(tmp_path):
    """q_proj.weight [N*D, H] row n*D+d is head n, dim d; o_proj [H, N*D]; MLP [out, in]."""
    cfg = small_cfg()
    params = random_params(cfg)
    write_hf_checkpoint(params, cfg, tmp_path / "hf")
    t = read_all(tmp_path / "hf")
    N, D, H = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    q = t["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (N * D, H)
    np.testing.assert_array_equal(q[2 * D + 3], params["q"][1, :, 2, 3])
    o = t["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(o[:, 1 * D + 5], params["o"][0, 1, 5, :])
    np.testing.assert_array_equal(t["model.layers.0.mlp.down_proj.weight"], params["down"][0].T)
    assert "lm_head.weight" not in t  # tied


def test_streaming_writer_is_read_by_safetensors(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
              "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
              "c": rng.standard_normal((2, 2, 2)).astype(np.float16)}
    write_safetensors(tmp_path / "x.safetensors",
                      [(k, lambda v=v: v, v.shape, v.dtype) for k, v in arrays.items()])
    save_file(arrays, str(tmp_path / "ref.safetensors"))
    ours, ref = read_all_file(tmp_path / "x.safetensors"), read_all_file(tmp_path / "ref.safetensors")
    assert_bit_equal(ours, arrays)
    assert_bit_equal(ref, arrays)


def read_all_file(path):
    with safe_open(str(path), "np") as st:
        return {k: st.get_tensor(k) for k in st.keys()}


def test_mcpm_checkpoint_round_trip(tmp_path):
    cfg = small_cfg(rope_scaling=None)
    params = random_params(cfg)
    save_checkpoint(tmp_path / "ck", cfg, params)
    cfg2, template, back = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg and template is None
    assert_bit_equal(params, back)


# -- bad input -------------------------------------------------------------------------------

@pytest.fixture
def hf_copy(tmp_path):
    cfg = small_cfg(tie_word_embeddings=False)
    write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "src")
    return tmp_path / "src"


def _rewrite(hf_dir: Path, edit):
    tensors = read_all(hf_dir)
    edit(tensors)
    (hf_dir / "model.safetensors").unlink()
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_copy):
    _rewrite(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        read_hf_checkpoint(hf_copy)


def test_extra_tensor_is_named(hf_copy):
    _rewrite(hf_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.2\.mlp\.up_proj"):
        read_hf_checkpoint(hf_copy)


def test_wrong_shape_says_expected_and_found(hf_copy):
    _rewrite(hf_copy, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \[8, 32\], expected \[16, 32\]"):
        read_hf_checkpoint(hf_copy)


def test_config_that_does_not_match_weights(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight has shape \[32, 48\], expected \[32, 64\] from config\.json"):
        read_hf_checkpoint(hf_copy)


def test_untied_config_with_tied_weights_hints(hf_copy):
    _rewrite(hf_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        read_hf_checkpoint(hf_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(hf_copy, damage, tmp_path):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors"):
        read_hf_checkpoint(hf_copy)
    # the CLI reports it and writes nothing
    assert cli(["convert", "from-hf", str(hf_copy), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_index_pointing_to_missing_shard(tmp_path):
    cfg = small_cfg()
    write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "hf", max_shard_size="5KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        read_hf_checkpoint(tmp_path / "hf")


def test_existing_output_is_refused_unless_overwrite(hf_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli(["convert", "from-hf", str(hf_copy), str(out)]) == 2
    assert (out / "keep.txt").read_text() == "precious"
    assert cli(["convert", "from-hf", str(hf_copy), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    cfg = small_cfg()
    params = random_params(cfg)
    params["down"] = params["down"][:, :-1]  # wrong shape: refused before anything is written
    with pytest.raises(CheckpointError, match=r"parameter down has shape"):
        write_hf_checkpoint(params, cfg, tmp_path / "x")
    import mcpm.hf as hf_mod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hf_mod, "write_safetensors", boom)
    with pytest.raises(OSError):
        write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "y")
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither an mcpm checkpoint"):
        mcpm.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        mcpm.from_pretrained(tmp_path / "nope")
    from mcpm.config import ConfigError, model_config_to_hf
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="missing required keys"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(small_cfg())))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only PyTorch pickle weights.*safetensors"):
        read_hf_checkpoint(tmp_path)


def test_missing_or_wrong_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope does not exist; give the directory of a "
                                              r"Hugging Face model"):
        read_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"f is a file, not a directory"):
        read_hf_checkpoint(tmp_path / "f")
    cfg = small_cfg()
    save_checkpoint(tmp_path / "ck", cfg, random_params(cfg))
    with pytest.raises(CheckpointError, match=r"ck: no config\.json; it is an mcpm checkpoint: "
                                              r"`mcpm convert to-hf` exports it"):
        read_hf_checkpoint(tmp_path / "ck")


def test_non_finite_weights_are_converted_with_a_warning_naming_them(tmp_path):
    cfg = small_cfg(tie_word_embeddings=False)
    params = random_params(cfg, ml_dtypes.bfloat16)
    params["up"][1, 0, :3] = np.nan   # HF model.layers.1.mlp.up_proj.weight
    params["lm_head"][2, 5] = np.inf
    write_hf_checkpoint(params, cfg, tmp_path / "hf", max_shard_size="5KB")
    up = "model.layers.1.mlp.up_proj.weight"
    files = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.warns(UserWarning) as record:
        _, _, back = read_hf_checkpoint(tmp_path / "hf")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2  # one per file
    assert any(m.startswith(f"{tmp_path / 'hf' / files[up]}: 1 tensor(s) hold NaN or Inf values: "
                            f"{up} (3 of 1536)") for m in messages)
    assert any(f"{files['lm_head.weight']}: 1 tensor(s) hold NaN or Inf values: lm_head.weight "
               "(1 of 3072)" in m for m in messages)
    assert_bit_equal(params, back)  # kept as they are
    save_checkpoint(tmp_path / "ck", cfg, back)
    with pytest.warns(UserWarning, match=r"ck/params: 2 tensor\(s\) hold NaN or Inf values: "
                                         r"lm_head \(1 of 3072\), up \(3 of 3072\)"):
        load_checkpoint(tmp_path / "ck")


def test_count_nonfinite_in_bounded_chunks():
    from mcpm.hf import count_nonfinite
    x = np.ones(1000, np.float16)
    assert count_nonfinite(x) == 0
    x[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    assert count_nonfinite(x, chunk=7) == 3
    big = np.full(10, 6e4, np.float16)  # the sum overflows float16, yet all are finite
    assert count_nonfinite(big) == 0
    assert count_nonfinite(np.arange(5)) == 0  # integers are always finite


@pytest.mark.parametrize("text,ok", [("5GB", 5 * 10**9), ("500 MB", 5 * 10**8), ("2GiB", 2**31),
                                     ("1.5kb", 1500), ("4096", 4096), (123, 123)])
def test_parse_size(text, ok):
    from mcpm.hf import parse_size
    assert parse_size(text) == ok


@pytest.mark.parametrize("text", ["5XB", "GB", "", "-1GB", "0"])
def test_parse_size_rejects_what_is_not_a_size(text):
    from mcpm.config import UserError
    from mcpm.hf import SizeError, parse_size
    with pytest.raises(SizeError, match=r"max_shard_size '.*' (is not a size|must be "
                                        r"positive)") as e:
        parse_size(text, "max_shard_size")
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def _listing(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes()) for p in root.rglob("*"))


def test_replacing_an_output_leaves_nothing_behind_whatever_fails(tmp_path, monkeypatch):
    import mcpm.hf as hf_mod
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _listing(tmp_path)

    # interrupted while writing: the old output is untouched, no temporary directory left
    with pytest.raises(KeyboardInterrupt):
        with hf_mod.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == before

    # the final rename fails: the old output is put back where it was
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out and ".tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        with hf_mod.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == before
    monkeypatch.setattr(Path, "rename", real_rename)

    # the old output cannot be deleted: it is replaced, and a warning says where the rest is
    real_rmtree = hf_mod.shutil.rmtree
    monkeypatch.setattr(hf_mod.shutil, "rmtree", lambda p, ignore_errors=False: None)
    with pytest.warns(UserWarning, match=r"replaced .*out, but the previous one could not be "
                                         r"deleted: what is left of it is in .*/\.out\.old-"):
        with hf_mod.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(hf_mod.shutil, "rmtree", real_rmtree)
    assert (out / "new.txt").read_text() == "new"
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert (left / "out" / "keep.txt").read_text() == "precious"


def test_a_failed_write_removes_the_parent_directories_it_made(tmp_path, monkeypatch):
    import mcpm.hf as hf_mod
    cfg = small_cfg()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hf_mod, "write_safetensors", boom)
    with pytest.raises(OSError):
        write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(hf_mod.SizeError):  # a bad size is refused before anything is made
        write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "c" / "out", max_shard_size="5XB")
    assert list(tmp_path.iterdir()) == []
