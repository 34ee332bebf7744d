"""The built-in corpus as a TFDS dataset in ArrayRecord format, and its tokenizer, both prepared once.

TFDS 4.9.10 builds and reads ArrayRecord datasets without TensorFlow: ``McpmStdlib`` is an
ordinary ``tfds.core.GeneratorBasedBuilder``; ``download_and_prepare(file_format="array_record")``
writes ``<data_dir>/mcpm_stdlib/1.0.0/`` (``dataset_info.json``, ``features.json`` and one
``mcpm_stdlib-{train,validation}.array_record-00000-of-00001`` shard per split) into a temporary
``incomplete.*`` folder that TFDS renames into place when it is complete, so a half-prepared
dataset is never read. A file lock serialises concurrent preparers on one machine. Reading goes
through ``builder.as_data_source(split)`` (random access; records come back as
``{"text": bytes, "path": bytes}``).

Documents: one per standard-library ``.py`` file (tests excluded), the file's full text (its
docstrings included, not repeated as separate documents). Every 50th file in sorted order is the
``validation`` split, the rest ``train``. The corpus depends on the running Python, so it lives
under ``<cache>/builtin/py3.X/`` (``py3.X-first<N>`` when limited to the first N files).

The SentencePiece model (``train_tokenizer``, BPE, byte fallback, vocabulary 4096 as in
``configs/tiny.yaml``) is trained on the train split's files once and cached beside it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from mcpm.data.builtin_corpus import stdlib_root, stdlib_splits

log = logging.getLogger("mcpm.data")

DATASET_NAME = "mcpm_stdlib"
CACHE_ENV = "MCPM_CACHE"
TOKENIZER_SENTENCES = 300_000  # lines sampled for tokenizer training (the demo's setting)


def default_cache_dir() -> Path:
    """``$MCPM_CACHE`` if set, else ``~/.cache/mcpm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/mcpm").expanduser()


def builtin_dir(cache_dir: str | Path | None = None, limit: int | None = None) -> Path:
    """Where the built-in corpus and its tokenizer for this Python live."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    if limit:
        tag += f"-first{limit}"
    return root / "builtin" / tag


class McpmStdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's sources, one document per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One document per standard-library .py file; every 50th file is "
                              "the validation split."}

    def __init__(self, *, limit: int | None = None, **kwargs):
        self._limit = limit or None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard-library sources (mcpm's built-in corpus, no download).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(files)
                for name, files in stdlib_splits(self._limit).items()}

    def _generate_examples(self, files):
        root = stdlib_root()
        for f in files:
            rel = f.relative_to(root).as_posix()
            yield rel, {"text": f.read_bytes().decode("utf-8", errors="replace"), "path": rel}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (a no-op where ``fcntl`` does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
    """No TFDS progress bars while preparing (restored afterwards)."""
    from tensorflow_datasets.core.utils import tqdm_utils
    was = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(was)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # TFDS renames the finished folder into place, so its existence means complete
    return (Path(os.fspath(builder.data_path)) / "dataset_info.json").is_file()


def prepare_builtin_corpus(cache_dir: str | Path | None = None, limit: int | None = None
                           ) -> tfds.core.DatasetBuilder:
    """The prepared built-in corpus builder; prepares it first if this machine has not yet."""
    data_dir = builtin_dir(cache_dir, limit) / "tfds"
    builder = McpmStdlib(data_dir=os.fspath(data_dir), file_format="array_record", limit=limit)
    if _is_prepared(builder):
        return builder
    with _locked(data_dir.parent / ".tfds.lock"):
        builder = McpmStdlib(data_dir=os.fspath(data_dir), file_format="array_record", limit=limit)
        if not _is_prepared(builder):  # nobody else prepared it while we waited
            log.info("preparing the built-in corpus (Python standard library) as a TFDS "
                     "ArrayRecord dataset in %s (once)", data_dir)
            with _quiet_tfds():
                builder.download_and_prepare(file_format="array_record",
                                             download_dir=os.fspath(data_dir / "downloads"))
    return builder


def builtin_tokenizer(cache_dir: str | Path | None = None, limit: int | None = None,
                      vocab_size: int = 4096) -> Path:
    """Path of the SentencePiece model trained on the built-in corpus' train split (trained once)."""
    from mcpm.tokenizer import TOKENIZER_FILE, train_tokenizer

    out = builtin_dir(cache_dir, limit) / f"tokenizer-{vocab_size}"
    path = out / TOKENIZER_FILE
    if path.is_file():
        return path
    with _locked(out.parent / ".tokenizer.lock"):
        if path.is_file():
            return path
        log.info("training a %d-piece SentencePiece model on the built-in corpus into %s (once)",
                 vocab_size, out)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out.parent))
        try:
            train_tokenizer(stdlib_splits(limit)["train"], tmp, vocab_size=vocab_size,
                            max_sentences=TOKENIZER_SENTENCES)
            if out.exists():  # a stale partial folder without a model
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path
