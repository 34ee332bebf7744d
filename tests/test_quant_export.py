"""`mcpm quant ternarize` and `mcpm quant export`: post-training ternarization of mcpm and HF
checkpoints, the BitCPM4 HF release form (bf16) read back through mcpm's HF reader, the packed
export from the command line, refusals (twice, group size, float checkpoint, existing OUT) as
exit-2 messages, and no half-written output."""
import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import mcpm
import mcpm.checkpoint as checkpoint_mod
import mcpm.hf as hf_mod
from mcpm.api import model_from_params, params_of
from mcpm.checkpoint import load_checkpoint, save_checkpoint
from mcpm.cli import main
from mcpm.config import ModelConfig, QuantConfig
from mcpm.hf import read_hf_checkpoint, write_hf_checkpoint
from mcpm.quant.export import export_hf, ternarize_checkpoint
from mcpm.quant.qat import (HIDDEN_MATRICES, QUANT_FILE, as_matrices, read_quant_info,
                            recover_ternary, ternarize_params)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128,
                                 dim_model_base=16, eos_token_id=(2,), initializer_range=0.3),
                          **kw})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A float mcpm checkpoint (with a tokenizer file), the same model as an HF directory, and
    its post-training ternarization with groups of 16."""
    root = tmp_path_factory.mktemp("ws")
    cfg = tiny_cfg()
    params = params_of(mcpm.MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.model").write_bytes(b"a tokenizer")
    save_checkpoint(root / "float", cfg, params, aux_dir=root / "tok")
    write_hf_checkpoint(params, cfg, root / "float_hf")
    ternarize_checkpoint(root / "float", root / "ternary", group_size=16)
    return root, cfg, params


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes())
                  for p in root.rglob("*"))


def test_ternarize_writes_the_absmean_ternary_model_and_its_record(ws):
    root, cfg, params = ws
    info = read_quant_info(root / "ternary")
    assert info == {"method": "ternary", "group_size": 16, "tensors": list(HIDDEN_MATRICES)}
    _, _, tparams = load_checkpoint(root / "ternary")
    want = ternarize_params(params, QuantConfig(method="ternary", group_size=16), cfg)
    for name in want:
        np.testing.assert_array_equal(tparams[name], want[name], err_msg=name)
    for name in HIDDEN_MATRICES:          # exactly q * scale with groups of 16
        recover_ternary(np.asarray(as_matrices(name, tparams[name])), 16, name=name)
    np.testing.assert_array_equal(tparams["embed"], params["embed"])   # embeddings stay float
    assert (root / "ternary" / "tokenizer.model").read_bytes() == b"a tokenizer"


def test_ternarize_reads_an_hf_checkpoint_with_embeddings(ws, tmp_path, capsys):
    root, cfg, params = ws
    code, out, err = run(["quant", "ternarize", root / "float_hf", tmp_path / "t", "--embeddings"],
                         capsys)
    assert code == 0, err
    assert re.fullmatch(r"wrote \S+/t: ternary checkpoint \(q, k, v, o, gate, up, down, embed; "
                        r"one scale per matrix and layer; \d+\.\d% zeros\), \S+ [KM]B\n", out), out
    _, _, tparams = load_checkpoint(tmp_path / "t")
    q, s = recover_ternary(np.asarray(as_matrices("embed", tparams["embed"])), 0, name="embed")
    assert s.shape == (1, 1) and set(np.unique(q)) <= {-1, 0, 1}


USER_ERRORS = [
    (["quant", "ternarize", "{root}/ternary", "{tmp}/out"],
     r"mcpm quant ternarize: error: \S+/ternary/quant\.json: \S+/ternary is already a ternary "
     r"checkpoint; quantizing a checkpoint twice would re-quantize its ternary weights .*"
     r"Export it as it is \(`mcpm quant export \S+ OUT --format hf\|packed\|gguf`\) or ternarize "
     r"the float checkpoint it was made from"),
    (["quant", "ternarize", "{root}/float", "{tmp}/out", "--group-size", "48"],
     r"mcpm quant ternarize: error: --group-size 48 does not divide the input dimension of "
     r"hidden_size \(q, k, v, gate, up\) = 64, num_attention_heads \* head_dim \(o\) = 64, "
     r"intermediate_size \(down\) = 128: use a divisor of 64 \(or 0 for one scale per "
     r"matrix\), in \S+/float"),
    (["quant", "ternarize", "{root}/float", "{tmp}/out", "--head"],
     r"mcpm quant ternarize: error: --head: \S+/float ties lm_head to the embedding "
     r"\(tie_word_embeddings\); pass --embeddings to ternarize the shared matrix"),
    (["quant", "ternarize", "{root}/float", "{tmp}/existing"],
     r"mcpm quant ternarize: error: \S+/existing already exists; choose another path or pass "
     r"--overwrite"),
    (["quant", "export", "{root}/float", "{tmp}/out", "--format", "hf"],
     r"mcpm quant export: error: \S+/float is a float checkpoint \(it has no quant\.json\); "
     r"exports are of ternary models: make one with `mcpm quant ternarize \S+/float OUT` "
     r"\(post-training\) or train with quant\.method=ternary, then export that checkpoint"),
    (["quant", "export", "{root}/float", "{tmp}/out", "--format", "packed"],
     r"mcpm quant export: error: \S+/float is a float checkpoint"),
    (["quant", "export", "{root}/ternary", "{tmp}/existing", "--format", "packed"],
     r"mcpm quant export: error: \S+/existing already exists; choose another path"),
    (["quant", "export", "{root}/missing", "{tmp}/out", "--format", "hf"],
     r"mcpm quant export: error: \S+/missing does not exist; give a ternary mcpm checkpoint"),
]


@pytest.mark.parametrize("argv,message", USER_ERRORS,
                         ids=[f"{c[0][1]} #{i}" for i, c in enumerate(USER_ERRORS)])
def test_a_user_error_is_one_message_with_exit_2_and_writes_nothing(ws, tmp_path, capsys, argv,
                                                                    message):
    root = ws[0]
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    before, before_root = snapshot(tmp_path), snapshot(root)
    code, _, err = run([a.format(root=root, tmp=tmp_path) for a in argv], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(message + r".*\n", err), err
    assert snapshot(tmp_path) == before and snapshot(root) == before_root


@nnx.jit
def forward(model, ids):
    return model(ids)


def test_hf_export_is_bf16_ternary_and_gives_the_ternary_models_logits(ws, tmp_path, capsys):
    root, cfg, _ = ws
    code, out, err = run(["quant", "export", root / "ternary", tmp_path / "hf", "--format", "hf"],
                         capsys)
    assert code == 0, err
    assert re.fullmatch(r"wrote \S+/hf: Hugging Face checkpoint, bfloat16, 7 ternary tensors "
                        r"dequantized, \S+ [KM]B in all\n", out), out
    config_text = (tmp_path / "hf" / "config.json").read_text()
    assert "quant" not in config_text and json.loads(config_text)["torch_dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"a tokenizer"
    hcfg, _, hparams = read_hf_checkpoint(tmp_path / "hf")
    assert {a.dtype for a in hparams.values()} == {np.dtype(ml_dtypes.bfloat16)}
    _, _, tparams = load_checkpoint(root / "ternary")
    for name in HIDDEN_MATRICES:
        # still ternary with groups of 16: the same q, the scales rounded to bfloat16
        q, s = recover_ternary(np.asarray(as_matrices(name, hparams[name].astype(np.float32))),
                               16, name=name)
        q0, s0 = recover_ternary(np.asarray(as_matrices(name, tparams[name])), 16, name=name)
        np.testing.assert_array_equal(q, q0)
        np.testing.assert_array_equal(s, s0.astype(ml_dtypes.bfloat16).astype(np.float32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
    got = np.asarray(forward(model_from_params(hcfg, hparams), ids))
    want = np.asarray(forward(model_from_params(cfg, tparams), ids))
    # every scale (and the float embedding and norms) is rounded to bfloat16, a relative error
    # of at most 2**-9 each; through two layers and the head that is ~0.5% of the logits
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_packed_export_from_the_command_line(ws, tmp_path, capsys):
    root, cfg, _ = ws
    code, out, err = run(["quant", "export", root / "ternary", tmp_path / "p", "--format",
                          "packed", "--packing", "tq1"], capsys)
    assert code == 0, err
    assert re.fullmatch(r"wrote \S+/p: packed tq1 checkpoint, \S+ KB in all; the 7 ternary layer "
                        r"matrices take \S+ KB with scales vs \S+ KB in bfloat16 "
                        r"\(\d+\.\dx smaller\)\n", out), out
    info = json.loads((tmp_path / "p" / QUANT_FILE).read_text())
    assert info["packing"] == "tq1" and info["group_size"] == 16
    model = mcpm.from_pretrained(tmp_path / "p")
    assert model.packing.fmt == "tq1" and model.packing.names == HIDDEN_MATRICES
    # quantizing the packed checkpoint again is refused too (it carries quant.json)
    code, _, err = run(["quant", "ternarize", tmp_path / "p", tmp_path / "again"], capsys)
    assert code == 2 and "is already a ternary checkpoint" in err


def test_a_failed_export_or_ternarize_leaves_nothing_and_keeps_an_old_out(ws, tmp_path,
                                                                          monkeypatch):
    root = ws[0]

    def fail(path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf_mod, "write_safetensors", fail)
    monkeypatch.setattr(checkpoint_mod, "_save_params",
                        lambda path, params: fail(path.with_name("params.part")))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("precious")
    for attempt in (lambda out, **kw: export_hf(root / "ternary", out, **kw),
                    lambda out, **kw: ternarize_checkpoint(root / "float", out, **kw)):
        with pytest.raises(OSError, match="No space left"):
            attempt(tmp_path / "new" / "out")
        with pytest.raises(OSError, match="No space left"):
            attempt(tmp_path / "old", overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
        assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
