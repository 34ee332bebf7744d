"""The built-in corpus: a TFDS ArrayRecord dataset of the stdlib's sources and its tokenizer,
prepared once into the cache (atomically), then reused; the default data config reads it."""
import os
from pathlib import Path

import numpy as np
import pytest

from mcpm.config import DataConfig, DataSourceConfig
from mcpm.data import builtin_tfds
from mcpm.data.builtin_corpus import stdlib_root, stdlib_splits
from mcpm.data.pipeline import make_iterator
from mcpm.tokenizer import Tokenizer

LIMIT = 8


def _files(root: Path):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_builtin_corpus_is_prepared_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MCPM_CACHE", str(tmp_path / "cache"))
    # pieces in document order, so that row 0 starts with a document's first piece
    cfg = DataConfig(seq_len=128, batch_size=2, builtin_limit=LIMIT, builtin_vocab_size=400,
                     prefetch=0, shuffle_window=0)
    it = make_iterator(cfg)  # prepares the dataset and trains the tokenizer
    batches = [next(it) for _ in range(4)]
    root = tmp_path / "cache" / "builtin"
    version = next(root.iterdir())
    assert version.name.endswith(f"-first{LIMIT}")
    ds_dir = version / "tfds" / "mcpm_stdlib" / "1.0.0"
    names = sorted(p.name for p in ds_dir.iterdir())
    assert names == ["dataset_info.json", "features.json",
                     "mcpm_stdlib-train.array_record-00000-of-00001",
                     "mcpm_stdlib-validation.array_record-00000-of-00001"]
    tok_file = version / "tokenizer-400" / "tokenizer.model"
    assert it.tokenizer_path == tok_file and Tokenizer(tok_file).vocab_size == it.vocab_size == 400
    # the text of the stdlib's files, bos ... eos, decodes back exactly
    splits = stdlib_splits(LIMIT)
    texts = {f.read_text(encoding="utf-8", errors="replace") for f in splits["train"]}
    tok = Tokenizer(tok_file)
    first = batches[0]
    seg = first["inputs"][0][first["segment_ids"][0] == 1]
    assert seg[0] == 1
    assert any(t.startswith(tok.decode(seg)) for t in texts)
    assert it.stats()["split_documents"] >= 1  # stdlib files are longer than 128 tokens

    # a second run: nothing is rebuilt or retrained
    before = _files(version)

    def boom(*a, **k):
        raise AssertionError("rebuilt")
    monkeypatch.setattr(builtin_tfds.McpmStdlib, "_generate_examples", boom)
    monkeypatch.setattr("mcpm.tokenizer.train_tokenizer", boom)
    again = make_iterator(cfg)
    for want in batches:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in got)
    assert _files(version) == before


def test_builtin_splits_and_validation_source(tmp_path):
    splits = stdlib_splits(LIMIT)
    assert len(splits["validation"]) == 1 and len(splits["train"]) == LIMIT - 1
    assert not set(splits["train"]) & set(splits["validation"])
    builder = builtin_tfds.prepare_builtin_corpus(tmp_path, LIMIT)
    val = builder.as_data_source("validation")
    rel = splits["validation"][0].relative_to(stdlib_root()).as_posix()
    assert len(val) == 1 and val[0]["path"].decode() == rel
    assert val[0]["text"].decode() == splits["validation"][0].read_text(errors="replace")
    assert len(builder.as_data_source("train")) == LIMIT - 1


def test_a_failed_preparation_is_never_used(tmp_path, monkeypatch):
    real = builtin_tfds.McpmStdlib._generate_examples

    def half(self, files):
        gen = real(self, files)
        yield next(gen)
        raise OSError("disk full")
    monkeypatch.setattr(builtin_tfds.McpmStdlib, "_generate_examples", half)
    with pytest.raises(OSError, match="disk full"):
        builtin_tfds.prepare_builtin_corpus(tmp_path, LIMIT)
    data_dir = builtin_tfds.builtin_dir(tmp_path, LIMIT) / "tfds" / "mcpm_stdlib"
    assert not (data_dir / "1.0.0").exists()  # only an incomplete.* temp folder, if anything
    monkeypatch.undo()
    builder = builtin_tfds.prepare_builtin_corpus(tmp_path, LIMIT)
    assert len(builder.as_data_source("train")) == LIMIT - 1


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MCPM_CACHE", raising=False)
    assert builtin_tfds.default_cache_dir() == Path(os.path.expanduser("~/.cache/mcpm"))
    monkeypatch.setenv("MCPM_CACHE", str(tmp_path))
    assert builtin_tfds.default_cache_dir() == tmp_path
    assert builtin_tfds.builtin_dir("/x", 5).parts[-3:] == (
        "x", "builtin", f"py{__import__('sys').version_info.major}."
        f"{__import__('sys').version_info.minor}-first5")
    assert DataConfig().sources == (DataSourceConfig(kind="builtin"),)
