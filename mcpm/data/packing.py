"""Tokenizing documents and packing them into fixed-size batches, as grain transformations.

:class:`Tokenize` (a ``grain.transforms.Map``) turns a raw document into ``bos + ids + eos``
(int32), decoding invalid UTF-8 with replacement and flagging empty or unreadable documents.
:class:`PackIterDataset` packs the token sequences into batches of ``rows x seq_len`` for the
train step: ``inputs``, ``targets`` (the next token within the same piece), ``weights`` (1.0 where
the target is a real next token, 0.0 at each piece's last token and on padding), ``positions``
(0, 1, ... restarting per piece) and ``segment_ids`` (1, 2, ... per piece in a row, 0 = padding).

A sequence longer than ``piece_len`` is split into pieces of ``piece_len`` tokens that overlap by
one token (piece k ends with the token piece k+1 starts with), so every next-token target of the
document is still trained exactly once; each piece is its own segment.

Packing is first fit over the batch's rows, in stream order: a piece goes to the first row with
room; when it fits in no row the batch is emitted and the piece starts the next batch. The
iterator state is the parent's state before the document that did not fit plus the index of its
first unplaced piece, so a restored iterator re-reads that document and produces exactly the
batches the original would have.

Each batch carries the counters of its own making under ``"_stats"`` (see :data:`STAT_KEYS`);
:class:`mcpm.data.pipeline.DataIterator` sums them and removes the key.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Sequence

import grain
import numpy as np

from mcpm.data.sources import BAD_RECORDS, INVALID_UTF8, UNREADABLE_FILES, DataSourceError

STAT_KEYS = (
    "batches",                 # batches produced
    "documents",               # documents packed (all their pieces)
    "segments",                # pieces packed (a document longer than max_doc_tokens has several)
    "tokens",                  # tokens packed (bos and eos included)
    "target_tokens",           # tokens with weight 1 (what the loss sees)
    "padding_tokens",          # padding in the batches
    "empty_documents",         # skipped: no text (or only whitespace)
    INVALID_UTF8,              # decoded with U+FFFD replacements, then used
    "split_documents",         # longer than max_doc_tokens: split into pieces, all used
    BAD_RECORDS,               # skipped: corrupt record (bad JSON line, missing text field, ...)
    UNREADABLE_FILES,          # skipped: file that could not be read (at start or later)
)
DOC_KEY = "documents/{}"       # documents packed per source (mixture proportions)
MAX_SKIPPED_IN_A_ROW = 10_000  # this many unusable documents in a row is an error, not a hang
MAX_ENCODE_CHARS = 1 << 20     # longer texts are tokenized in chunks cut at line ends


class Tokenize(grain.transforms.Map):
    """``(source index, (payload, event))`` -> ``{"tokens", "source", "events"}``."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = str(tokenizer_path)
        self._tok = None
        self._cont = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path}

    def __setstate__(self, state):
        self.__init__(state["tokenizer_path"])

    def _tokenizer(self):
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    from mcpm.tokenizer import Tokenizer
                    self._tok = Tokenizer(self.tokenizer_path)
        return self._tok

    def _continuation(self):
        """The model without its dummy-prefix space, for the 2nd, 3rd, ... chunk of a long text
        (so that the chunks' ids decode to the text itself, no space added at each cut)."""
        if self._cont is None:
            sp = self._tokenizer().sp
            try:
                from sentencepiece import sentencepiece_model_pb2 as model_pb2
                proto = model_pb2.ModelProto()
                proto.ParseFromString(sp.serialized_model_proto())
                proto.normalizer_spec.add_dummy_prefix = False
                import sentencepiece as spm
                self._cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            except Exception:  # noqa: BLE001 - no protobuf: a space at each cut, nothing lost
                self._cont = sp
        return self._cont

    def map(self, element):
        source, (payload, event) = element
        events = (event,) if event else ()
        text = payload
        if isinstance(text, (bytes, bytearray, memoryview)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                text = bytes(text).decode("utf-8", errors="replace")
                events += (INVALID_UTF8,)
        if text is None:  # unreadable: the event says why
            return {"tokens": np.zeros(0, np.int32), "source": source, "events": events}
        if not text.strip():
            return {"tokens": np.zeros(0, np.int32), "source": source,
                    "events": events + ("empty_documents",)}
        tok = self._tokenizer()
        ids = [tok.bos_id] if tok.bos_id >= 0 else []
        for i, chunk in enumerate(_chunks(text, MAX_ENCODE_CHARS)):
            ids.extend((tok.sp if i == 0 else self._continuation()).encode(chunk))
        ids.append(tok.eos_ids[0])
        return {"tokens": np.asarray(ids, np.int32), "source": source, "events": events}


def _chunks(text: str, size: int):
    """``text`` in pieces of at most ~``size`` characters, cut after a newline where possible."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:
            cut = start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def piece_starts(n: int, piece_len: int) -> range:
    """Start offsets of the pieces of an ``n``-token sequence (pieces overlap by one token)."""
    if n <= piece_len:
        return range(0, 1)
    return range(0, n - 1, piece_len - 1)


class PackIterDataset(grain.IterDataset):
    """Packs tokenized documents into batches ``[rows, seq_len]`` (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, rows: int, piece_len: int,
                 source_labels: Sequence[str]):
        super().__init__(parent)
        if not 2 <= piece_len <= seq_len:
            raise ValueError(f"piece_len must be in [2, seq_len={seq_len}], got {piece_len}")
        self.seq_len, self.rows, self.piece_len = seq_len, rows, piece_len
        self.source_labels = tuple(source_labels)

    def __iter__(self):
        return PackIterator(self._parent.__iter__(), seq_len=self.seq_len, rows=self.rows,
                            piece_len=self.piece_len, source_labels=self.source_labels)

    def __str__(self):
        return f"PackIterDataset(rows={self.rows}, seq_len={self.seq_len})"


def stat_keys(source_labels: Sequence[str]) -> tuple[str, ...]:
    return STAT_KEYS + tuple(DOC_KEY.format(s) for s in source_labels)


class PackIterator(grain.DatasetIterator):

    def __init__(self, parent, *, seq_len: int, rows: int, piece_len: int,
                 source_labels: Sequence[str]):
        super().__init__(parent)
        self._T, self._R, self._P = seq_len, rows, piece_len
        self._labels = tuple(source_labels)
        self._keys = stat_keys(source_labels)
        self._pending: list | None = None  # [tokens, source, starts, next piece]
        self._pending_state: dict | None = None  # parent state before the pending document
        self._replay = False  # the next document was counted already (restored mid-document)
        self._skip = 0  # pieces of the next document already emitted (restored mid-document)
        self._bad_run = 0
        self._exhausted = False

    # -- checkpointing ------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"parent": copy.deepcopy(self._pending_state), "pending": 1,
                    "piece": int(self._pending[3]), "bad_run": self._bad_run}
        return {"parent": self._parent.get_state(), "pending": int(self._replay),
                "piece": int(self._skip), "bad_run": self._bad_run}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state = None, None
        self._replay, self._skip = bool(state["pending"]), int(state["piece"])
        self._bad_run = int(state["bad_run"])
        self._exhausted = False

    # -- packing --------------------------------------------------------------------------------
    def _pull(self, delta: dict) -> bool:
        """Read the next usable document into ``self._pending``; False at the end of the data."""
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return False
            replay, self._replay = self._replay, False
            if not replay:
                for event in doc["events"]:
                    delta[event] += 1
            tokens = doc["tokens"]
            if len(tokens) == 0:
                self._bad_run += 1
                if self._bad_run >= MAX_SKIPPED_IN_A_ROW:
                    raise DataSourceError(
                        f"{self._bad_run} documents in a row were empty or unreadable (the last "
                        f"from data source {self._labels[doc['source']]}); check the data (the "
                        "warnings above name the files)")
                continue
            self._bad_run = 0
            starts = piece_starts(len(tokens), self._P)
            if len(starts) > 1 and not replay:
                delta["split_documents"] += 1
            self._pending = [tokens, int(doc["source"]), starts, self._skip]
            self._pending_state = state
            self._skip = 0
            return True

    def __next__(self):
        if self._exhausted:
            raise StopIteration
        R, T, P = self._R, self._T, self._P
        inputs = np.zeros((R, T), np.int32)
        targets = np.zeros((R, T), np.int32)
        weights = np.zeros((R, T), np.float32)
        positions = np.zeros((R, T), np.int32)
        segments = np.zeros((R, T), np.int32)
        fill, nseg = [0] * R, [0] * R
        delta = dict.fromkeys(self._keys, 0)
        while True:
            if self._pending is None and not self._pull(delta):
                self._exhausted = True
                if not any(fill):
                    raise StopIteration
                break  # the last, partly filled batch
            tokens, source, starts, k = self._pending
            full = False
            while k < len(starts):
                piece = tokens[starts[k]:starts[k] + P]
                n = len(piece)
                r = next((r for r in range(R) if fill[r] + n <= T), None)
                if r is None:
                    full = True
                    break
                f = fill[r]
                inputs[r, f:f + n] = piece
                targets[r, f:f + n - 1] = piece[1:]
                weights[r, f:f + n - 1] = 1.0
                positions[r, f:f + n] = np.arange(n, dtype=np.int32)
                nseg[r] += 1
                segments[r, f:f + n] = nseg[r]
                fill[r] = f + n
                k += 1
            self._pending[3] = k
            if full:
                break
            self._pending = None
            delta["documents"] += 1
            delta[DOC_KEY.format(self._labels[source])] += 1
        used = sum(fill)
        delta.update(batches=1, segments=sum(nseg), tokens=used, padding_tokens=R * T - used,
                     target_tokens=int(weights.sum()))
        return {"inputs": inputs, "targets": targets, "weights": weights, "positions": positions,
                "segment_ids": segments, "_stats": delta}

    def __str__(self):
        return f"PackIterator(rows={self._R}, seq_len={self._T})"
