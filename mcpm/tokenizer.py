"""SentencePiece tokenizers: load the official MiniCPM4 ``tokenizer.model`` or train a small one.

Trained models use MiniCPM's special-token ids: <unk> 0, <s> (bos) 1, </s> (eos) 2.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from mcpm.config import UserError

TOKENIZER_FILE = "tokenizer.model"
MIN_VOCAB_SIZE = 259  # <unk>, <s>, </s> and the 256 byte-fallback pieces


class TokenizerError(UserError, ValueError):
    """A file is not a SentencePiece model, or a tokenizer cannot be trained on the text given."""


class Tokenizer:
    """A SentencePiece model with the bos/eos ids of a model config."""

    def __init__(self, model_path: str | Path, bos_id: int | None = None,
                 eos_ids: Sequence[int] | None = None):
        path = Path(model_path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}; train one with "
                                    "`mcpm tokenizer train` or copy the official tokenizer.model")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({_sp_message(e)}); "
                                 "give a tokenizer.model file (or its directory) made by "
                                 "SentencePiece, e.g. with `mcpm tokenizer train`") from None
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_ids = tuple([self.sp.eos_id()] if eos_ids is None else eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, stopping at the first eos and skipping bos."""
        out = []
        for i in map(int, ids):
            if i in self.eos_ids:
                break
            if i != self.bos_id:
                out.append(i)
        return self.sp.decode(out)


def train_tokenizer(text_files: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 4096,
                    *, model_type: str = "bpe", max_sentences: int = 2_000_000,
                    character_coverage: float = 0.9995, seed_text: Iterable[str] | None = None
                    ) -> Path:
    """Train a SentencePiece model on local text files; writes ``out_dir/tokenizer.model``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"a vocabulary of {vocab_size} pieces is too small: it needs at "
                             f"least {MIN_VOCAB_SIZE} (3 special pieces and 256 byte pieces)")
    files = [Path(f) for f in text_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer training text not found (or not a file): {missing}")
    count = [0]

    def sentences():
        if seed_text is not None:
            yield from seed_text
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.rstrip("\n")
                    if line.strip():
                        count[0] += 1
                        yield line

    where = _short([str(f) for f in files])
    model = io.BytesIO()
    # trained in memory first: a failed run leaves no output directory behind
    try:
        _train(sentences(), model, vocab_size, model_type, max_sentences, character_coverage)
    except RuntimeError as e:
        if not count[0] and seed_text is None:
            raise TokenizerError(f"no training text in {where}: the file(s) are empty or blank; "
                                 "give text files with --input") from None
        raise TokenizerError(f"cannot train a {vocab_size}-piece tokenizer on {where}: "
                             f"{_sp_message(e).rstrip('.')}; choose another vocabulary size "
                             "(--vocab-size)") from None
    out_dir = Path(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    path = out_dir / TOKENIZER_FILE
    tmp = path.with_suffix(".tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(model.getvalue())
        tmp.replace(path)
    except BaseException:  # leave no partial file and no directory this call made
        tmp.unlink(missing_ok=True)
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return path


def _train(sentences, model, vocab_size, model_type, max_sentences, character_coverage):
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, num_threads=2, minloglevel=2,
        # keep text exactly (code needs its whitespace), as Llama-style tokenizers do
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True)


def _sp_message(e: Exception) -> str:
    """SentencePiece's own message without its source location (``INTERNAL: x.cc(12) [...] ``)."""
    text = str(e).strip()
    text = re.sub(r"^(?:[A-Z_]+: )?(?:\S+\.cc\(\d+\) )?(?:\[.*?\] )?", "", text) or text
    # its advice names trainer options that `mcpm tokenizer train` does not have
    return re.sub(r"\s*Increase vocab_size or decrease character_coverage.*$", "", text)


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
