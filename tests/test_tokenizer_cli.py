"""Tokenizer training/loading and the `mcpm` command end to end on tiny models."""
import subprocess
import sys

import numpy as np
import pytest

import mcpm
from mcpm.cli import main as cli
from mcpm.data.builtin_corpus import stdlib_source_files
from mcpm.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(stdlib_source_files(limit=40), out, vocab_size=512, max_sentences=20000)
    return out


def test_trained_tokenizer_round_trips_and_uses_minicpm_ids(tok_dir):
    tok = Tokenizer(tok_dir, bos_id=1, eos_ids=(2,))
    assert tok.vocab_size == 512
    assert tok.sp.id_to_piece(0) == "<unk>" and tok.sp.id_to_piece(1) == "<s>"
    assert tok.sp.id_to_piece(2) == "</s>"
    text = "def parse(self, value):\n    return value + 12345  # ünïcode"
    ids = tok.encode(text)
    assert ids[0] == 1 and 2 not in ids
    assert tok.decode(ids) == text          # byte fallback keeps every character
    assert tok.decode(ids + [2, 50, 60]) == text  # stops at eos


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mcpm tokenizer train"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "o")


def test_tokenizer_user_errors_say_what_to_do_and_write_nothing(tmp_path):
    from mcpm.config import UserError
    from mcpm.tokenizer import TokenizerError

    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"bad\.model: not a SentencePiece model \(could "
                                             r"not parse .*\); give a tokenizer\.model") as e:
        Tokenizer(tmp_path / "bad.model")
    assert isinstance(e.value, UserError)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(TokenizerError, match=r"no training text in .*empty\.txt, .*blank\.txt: "
                                             r"the file\(s\) are empty or blank"):
        train_tokenizer([tmp_path / "empty.txt", tmp_path / "blank.txt"], tmp_path / "o" / "p")
    (tmp_path / "small.txt").write_text("hello world\nfoo bar\n")
    with pytest.raises(TokenizerError, match=r"cannot train a 4096-piece tokenizer on .*small\.txt: "
                                             r"Vocabulary size too high \(4096\)\. Please set it "
                                             r"to a value <= \d+; choose another vocabulary size"):
        train_tokenizer([tmp_path / "small.txt"], tmp_path / "o" / "p", vocab_size=4096)
    assert not (tmp_path / "o").exists()  # a failed training leaves no output directory


def test_init_convert_generate_cli(tok_dir, tmp_path, capsys):
    overrides = ["model.vocab_size=512", "model.num_hidden_layers=2", "model.hidden_size=64",
                 "model.intermediate_size=96"]
    assert cli(["init", "configs/tiny.yaml", str(tmp_path / "ck"), *overrides,
                "--tokenizer", str(tok_dir)]) == 0
    assert (tmp_path / "ck" / "tokenizer.model").is_file()
    assert cli(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "hf"), "--prompt", "import os",
                "generate.max_new_tokens=5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("import os") and "5 tokens" in out.err
    # the printed text is the decoded greedy continuation
    model = mcpm.from_pretrained(tmp_path / "hf")
    tok = Tokenizer(tmp_path / "hf")
    ids = tok.encode("import os")
    new = mcpm.generate(model, np.asarray([ids]), max_new_tokens=5)[0, len(ids):]
    assert out.out.rstrip("\n") == "import os" + tok.decode(new)


def test_cli_reports_bad_overrides(tmp_path, capsys):
    assert cli(["config", "show", "configs/tiny.yaml", "model.hiden_size=3"]) == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
    assert cli(["init", "configs/tiny.yaml", str(tmp_path / "x"), "model.num_attention_heads=3"]) == 2
    assert "divisible" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mcpm.cli", "--help"], capture_output=True,
                         text=True, check=True)
    for sub in ("convert", "generate", "init", "tokenizer", "demo"):
        assert sub in out.stdout
