"""The `mcpm` command's error paths, in process: a user's mistake is one `mcpm COMMAND: error:`
paragraph on stderr with exit status 2, and a refused or interrupted command leaves the
filesystem as it found it. `--debug` (or MCPM_DEBUG=1) shows the traceback instead."""
import json
import os
import signal
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import mcpm.hf as hf_mod
from mcpm.checkpoint import save_checkpoint
from mcpm.cli import main
from mcpm.config import ModelConfig
from mcpm.hf import SizeError, write_hf_checkpoint
from mcpm.model.minicpm4 import param_shapes
from mcpm.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.num_hidden_layers=1", "model.hidden_size=64", "model.intermediate_size=96",
         "model.dim_model_base=16", "model.vocab_size=512"]


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 dim_model_base=8, eos_token_id=(2,)), **kw})


def random_params(cfg, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(cfg).items()}


def snapshot(root: Path) -> list:
    """Every path under ``root`` with its contents (directories as True)."""
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes())
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta def class return import for while".split()
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(500)))
    train_tokenizer([d / "text.txt"], d / "tok", vocab_size=300)
    return d / "tok"


@pytest.fixture
def ws(tmp_path):
    """A workspace with an HF checkpoint, an mcpm checkpoint and some files to get wrong."""
    cfg = small_cfg()
    write_hf_checkpoint(random_params(cfg), cfg, tmp_path / "hf")
    save_checkpoint(tmp_path / "ck", cfg, random_params(cfg))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "fake.model").write_text("not a SentencePiece model")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    (tmp_path / "dup.yaml").write_text("model:\n  hidden_size: 64\n  hidden_size: 128\n")
    return tmp_path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


# Each case: arguments (with {ws}), and the one-line message expected on stderr (a regex).
CASES = [
    (["convert", "to-hf", "{ws}/ck", "{ws}/out", "--max-shard-size", "5XB"],
     r"mcpm convert to-hf: error: --max-shard-size '5XB' is not a size: write a number with an "
     r"optional unit, e\.g\. 5GB"),
    (["convert", "from-hf", "{ws}/missing", "{ws}/out"],
     r"mcpm convert from-hf: error: \S+/missing does not exist; give the directory of a Hugging "
     r"Face model"),
    (["convert", "to-hf", "{ws}/missing", "{ws}/out"],
     r"mcpm convert to-hf: error: \S+/missing does not exist; give an mcpm checkpoint "
     r"directory \(model\.yaml \+ params/\) or a Hugging Face model directory"),
    (["convert", "from-hf", "{ws}/ck", "{ws}/out"],
     r"mcpm convert from-hf: error: \S+/ck: no config\.json; it is an mcpm checkpoint: "
     r"`mcpm convert to-hf` exports it"),
    (["convert", "to-hf", "{ws}/ck", "{ws}/existing"],
     r"mcpm convert to-hf: error: \S+/existing already exists; choose another path or pass "
     r"--overwrite"),
    (["tokenizer", "train", "--out", "{ws}/tok_out", "--input", "{ws}/empty.txt"],
     r"mcpm tokenizer train: error: no training text in \S+/empty\.txt: the file\(s\) are empty "
     r"or blank; give text files with --input"),
    (["tokenizer", "train", "--out", "{ws}/tok_out", "--vocab-size", "100", "--input",
      "{ws}/empty.txt"],
     r"mcpm tokenizer train: error: a vocabulary of 100 pieces is too small: it needs at least "
     r"259"),
    (["init", TINY, "{ws}/empty.txt/out", *SMALL],
     r"mcpm init: error: cannot write \S+/empty\.txt/out: \S+/empty\.txt is a file, not a "
     r"directory; choose another path"),
    (["init", TINY, "{ws}/out", *SMALL, "--tokenizer", "{ws}/nonexistent"],
     r"mcpm init: error: --tokenizer \S+/nonexistent does not exist; give the directory that "
     r"holds tokenizer\.model"),
    (["init", TINY, "{ws}/out", *SMALL, "--tokenizer", "{ws}/empty_dir"],
     r"mcpm init: error: --tokenizer \S+/empty_dir holds no tokenizer files"),
    (["init", TINY, "{ws}/out", *SMALL, "--tokenizer", "{ws}/hf"],  # weights, no tokenizer
     r"mcpm init: error: --tokenizer \S+/hf holds no tokenizer files"),
    (["init", TINY, "{ws}/out", *SMALL, "--tokenizer", "{ws}/fake.model"],
     r"mcpm init: error: --tokenizer \S+/fake\.model is a file; give the directory"),
    (["init", TINY, "{ws}/out", "model.num_hidden_layers=1", "stray"],
     r"mcpm init: error: unexpected argument\(s\) \['stray'\]; overrides look like key=value"),
    (["config", "show", "{ws}/dup.yaml"],
     r"mcpm config show: error: \S+/dup\.yaml: the key 'model\.hidden_size' is given twice "
     r"\(lines 2 and 3\)"),
    (["config", "show", TINY, "seed=1", "model.hidden_size=abc"],
     r"mcpm config show: error: override model\.hidden_size=abc: model\.hidden_size: expected an "
     r"integer, got 'abc'"),
    (["train", TINY, "workdir={ws}/run", "steps=abc"],   # the alias as typed
     r"mcpm train: error: override steps=abc: train\.steps: expected an integer, got 'abc'"),
    (["generate", "{ws}/hf", "model.hidden_size=64"],
     r"mcpm generate: error: only \['model\.compute_dtype', 'model\.param_dtype'\] can be "
     r"overridden for a trained checkpoint, not \['model\.hidden_size'\]"),
    (["generate", "{ws}/hf", "--tokenizer", "{ws}/fake.model", "generate.max_new_tokens=1"],
     r"mcpm generate: error: \S+/fake\.model: not a SentencePiece model"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:3]) + f" #{i}"
                                                     for i, c in enumerate(CASES)])
def test_a_user_error_is_one_message_with_exit_2_and_changes_nothing(ws, capsys, argv, message):
    before = snapshot(ws)
    code, err = run([a.format(ws=ws) for a in argv], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    import re
    assert re.fullmatch(message + r".*\n", err), err
    assert snapshot(ws) == before


def test_from_hf_refuses_an_existing_output_before_reading(ws, capsys, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("read the checkpoint before refusing the output")
    monkeypatch.setattr(hf_mod, "read_hf_checkpoint", no_reading)
    before = snapshot(ws)
    code, err = run(["convert", "from-hf", ws / "hf", ws / "existing"], capsys)
    assert code == 2 and "existing already exists; choose another path or pass --overwrite" in err
    assert snapshot(ws) == before


def test_os_errors_on_a_path_are_user_errors(ws, capsys, monkeypatch):
    def denied(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", str(dir))
    monkeypatch.setattr(hf_mod.tempfile, "mkdtemp", denied)
    before = snapshot(ws)
    code, err = run(["convert", "to-hf", ws / "ck", ws / "sub" / "out"], capsys)
    assert code == 2
    assert err == f"mcpm convert to-hf: error: {ws / 'sub'}: Permission denied; check its " \
                  "permissions\n"
    assert snapshot(ws) == before  # the parent made for the output is gone again


def test_debug_shows_the_traceback(ws, capsys, monkeypatch):
    argv = ["convert", "to-hf", str(ws / "ck"), str(ws / "out"), "--max-shard-size", "5XB"]
    with pytest.raises(SizeError, match="5XB"):
        main(["--debug", *argv])
    monkeypatch.setenv("MCPM_DEBUG", "1")
    with pytest.raises(SizeError):
        main(argv)
    monkeypatch.setenv("MCPM_DEBUG", "0")
    assert main(argv) == 2


def test_a_bug_is_not_dressed_up_as_a_user_error(ws, monkeypatch):
    def bug(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(hf_mod, "write_hf_checkpoint", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["convert", "to-hf", str(ws / "ck"), str(ws / "out")])


def test_sigterm_while_writing_leaves_nothing(ws, capsys, monkeypatch):
    real = hf_mod.write_safetensors

    def terminated_midway(path, tensors):
        real(path, tensors[:1])
        os.kill(os.getpid(), signal.SIGTERM)
        real(path, tensors)
    monkeypatch.setattr(hf_mod, "write_safetensors", terminated_midway)
    before = snapshot(ws)
    for out in ("new", "existing"):  # a new output, and one being replaced
        code, err = run(["convert", "to-hf", ws / "ck", ws / out, "--overwrite"], capsys)
        assert code == 143 and err.endswith("mcpm convert to-hf: interrupted (SIGTERM)\n"), err
        assert snapshot(ws) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_non_finite_weights_convert_with_a_warning(tmp_path, capsys):
    cfg = small_cfg()
    params = random_params(cfg, ml_dtypes.bfloat16)
    params["gate"][0, 1, 2] = np.nan
    write_hf_checkpoint(params, cfg, tmp_path / "hf")
    code, err = run(["convert", "from-hf", tmp_path / "hf", tmp_path / "ck"], capsys)
    assert code == 0
    assert (f"mcpm convert from-hf: warning: {tmp_path / 'hf' / 'model.safetensors'}: 1 "
            "tensor(s) hold NaN or Inf values: model.layers.0.mlp.gate_proj.weight (1 of 1536); "
            "they are kept as they are") in err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 32


def test_train_reports_a_data_source_error(tok_dir, tmp_path, capsys):
    code, err = run(["train", TINY, f"workdir={tmp_path / 'run'}", "steps=1", "--no-progress",
                     *SMALL, "data.batch_size=2", "data.seq_len=16",
                     'data.sources=[{kind: files, paths: ["/nonexistent/*.txt"]}]',
                     f"data.tokenizer={tok_dir}"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert "mcpm train: error: data source files:/nonexistent/*.txt: no files match " \
           "['/nonexistent/*.txt']\n" in err


def test_the_program_ends_by_the_signal_after_cleaning_up(ws):
    """A real process (main() with argv None): SIGTERM midway -> nothing left, and the process
    ends by SIGTERM itself, as shells and process managers expect."""
    import subprocess
    import sys
    script = ("import os, signal, sys\n"
              "import mcpm.hf as hf\n"
              "real = hf.write_safetensors\n"
              "def midway(path, tensors):\n"
              "    real(path, tensors[:1])\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    real(path, tensors)\n"
              "hf.write_safetensors = midway\n"
              "from mcpm.cli import main\n"
              "sys.argv = ['mcpm'] + sys.argv[1:]\n"
              "sys.exit(main())\n")
    before = snapshot(ws)
    proc = subprocess.run([sys.executable, "-c", script, "convert", "to-hf", str(ws / "ck"),
                           str(ws / "out")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.endswith("mcpm convert to-hf: interrupted (SIGTERM)\n"), proc.stderr
    assert snapshot(ws) == before
