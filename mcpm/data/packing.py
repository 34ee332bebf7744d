"""Tokenizing documents, splitting them into pieces and packing the pieces into fixed-size
batches, as grain transformations.

:class:`Tokenize` (a ``grain.transforms.Map``) turns a raw document into ``bos + ids + eos``
(int32), decoding invalid UTF-8 with replacement and flagging empty or unreadable documents.
:class:`PackIterDataset` turns the token sequences into batches of ``rows x seq_len`` for the
train step: ``inputs``, ``targets`` (the next token within the same piece), ``weights`` (1.0 where
the target is a real next token, 0.0 at each piece's last token and on padding), ``positions``
(0, 1, ... restarting per piece) and ``segment_ids`` (1, 2, ... per piece in a row, 0 = padding).
It chains three stages::

    SplitIterDataset(documents)                      # each document -> its pieces, in order
      [.WindowShuffleIterDataset(shuffle_window)]    # pieces shuffled within windows
      -> PackIterator                                # pieces first fit into the batch's rows

A sequence longer than ``piece_len`` is split into pieces of ``piece_len`` tokens that overlap by
one token (piece k ends with the token piece k+1 starts with), so every next-token target of the
document is still trained exactly once; each piece is its own segment.

Shuffling *pieces* rather than only documents (``shuffle_window`` > 0: grain's window shuffle,
``shuffle_window`` pieces at a time, each window in its own seeded order) spreads a long
document over many batches, so a batch mixes many documents instead of being mostly one long
file. ``shuffle_window=0`` packs the pieces in stream order (a long document fills consecutive
rows and batches).

Packing is first fit over the batch's rows, in stream order: a piece goes to the first row with
room; when it fits in no row the batch is emitted and the piece starts the next batch.

Checkpoints: every stage's state is small and JSON-serialisable. The splitter's state is its
parent's state before the current document plus the index of the next piece; the window
shuffle's is its parent's state at the window's start plus the position in the window (a
restore re-reads and re-shuffles the window); the packer's is its parent's state before the
piece that did not fit. A restored iterator produces exactly the batches the original would.

Each batch carries the counters of its own making under ``"_stats"`` (see :data:`STAT_KEYS`):
a document's events and its ``documents`` counts travel with its first piece (an empty or
unreadable document is an empty element carrying only its events) and are counted when that
element is packed, so each is counted exactly once, also across a restore.
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
    "documents",               # documents packed (counted with their first piece)
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


def stat_keys(source_labels: Sequence[str]) -> tuple[str, ...]:
    return STAT_KEYS + tuple(DOC_KEY.format(s) for s in source_labels)


class OldStateError(DataSourceError):
    """A saved data-iterator state from an older layout of the pipeline."""


OLD_STATE_MESSAGE = (
    "the checkpoint's data-iterator state is from an older data pipeline (before "
    "data.shuffle_window: batches now mix the pieces of many documents) and cannot be "
    "restored into this one. Run `mcpm train ... --restart-data` to continue the weights and "
    "optimizer with a fresh data pipeline (its first batches are seen again), or train with "
    "the mcpm version that wrote the checkpoint")


class SplitIterDataset(grain.IterDataset):
    """Tokenized documents (``{"tokens", "source", "events"}``) -> their pieces, in order.

    Each element is ``{"tokens": piece, "source", "count": stat keys to add once the piece is
    packed, "doc": the document's number in this stream}``. A document's first piece counts
    its events, ``documents``, ``documents/<source>`` and ``split_documents``; an empty or
    unreadable document is one element with no tokens that counts its events.
    """

    def __init__(self, parent: grain.IterDataset, *, piece_len: int,
                 source_labels: Sequence[str]):
        super().__init__(parent)
        self.piece_len = piece_len
        self.source_labels = tuple(source_labels)

    def __iter__(self):
        return SplitIterator(self._parent.__iter__(), piece_len=self.piece_len,
                             source_labels=self.source_labels)

    def __str__(self):
        return f"SplitIterDataset(piece_len={self.piece_len})"


class SplitIterator(grain.DatasetIterator):

    def __init__(self, parent, *, piece_len: int, source_labels: Sequence[str]):
        super().__init__(parent)
        self._P = piece_len
        self._labels = tuple(source_labels)
        self._doc: list | None = None  # [tokens, source, starts, next piece, counts, number]
        self._doc_state: dict | None = None  # parent state before the current document
        self._skip = 0  # pieces of the next document already emitted (restored mid-document)
        self._bad_run = 0  # unusable documents in a row
        self._number = 0  # the next document's number

    def get_state(self) -> dict[str, Any]:
        if self._doc is not None:
            return {"parent": copy.deepcopy(self._doc_state), "piece": int(self._doc[3]),
                    "bad_run": self._bad_run, "doc": int(self._doc[5])}
        return {"parent": self._parent.get_state(), "piece": self._skip,
                "bad_run": self._bad_run, "doc": self._number}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state = None, None
        self._skip, self._bad_run = int(state["piece"]), int(state["bad_run"])
        self._number = int(state["doc"])

    def __next__(self):
        if self._doc is None:
            state = self._parent.get_state()
            doc = next(self._parent)
            tokens, source = doc["tokens"], int(doc["source"])
            number, self._number = self._number, self._number + 1
            skip, self._skip = self._skip, 0
            if len(tokens) == 0:
                self._bad_run += 1
                if self._bad_run >= MAX_SKIPPED_IN_A_ROW:
                    raise DataSourceError(
                        f"{self._bad_run} documents in a row were empty or unreadable (the last "
                        f"from data source {self._labels[source]}); check the data (the "
                        "warnings above name the files)")
                return {"tokens": tokens, "source": source, "count": tuple(doc["events"]),
                        "doc": number}
            self._bad_run = 0
            starts = piece_starts(len(tokens), self._P)
            counts = tuple(doc["events"]) + ("documents", DOC_KEY.format(self._labels[source]))
            if len(starts) > 1:
                counts += ("split_documents",)
            self._doc, self._doc_state = [tokens, source, starts, skip, counts, number], state
        tokens, source, starts, k, counts, number = self._doc
        piece = tokens[starts[k]:starts[k] + self._P]
        if k + 1 < len(starts):
            self._doc[3] = k + 1
        else:
            self._doc, self._doc_state = None, None
        return {"tokens": piece, "source": source, "count": counts if k == 0 else (),
                "doc": number}

    def __str__(self):
        return f"SplitIterator(piece_len={self._P})"


class PackIterDataset(grain.IterDataset):
    """Packs tokenized documents into batches ``[rows, seq_len]`` (see the module docstring):
    splits them into pieces of at most ``piece_len`` tokens, shuffles the pieces within windows
    of ``shuffle_window`` (0: no shuffle) seeded by ``seed``, and packs them. ``doc_ids``: each
    batch also holds ``"doc_ids"`` (``[rows, seq_len]`` int64, the packed token's document
    number in this stream, -1 on padding), for measuring how batches mix documents."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, rows: int, piece_len: int,
                 source_labels: Sequence[str], shuffle_window: int = 0, seed: int = 0,
                 doc_ids: bool = False):
        if not 2 <= piece_len <= seq_len:
            raise ValueError(f"piece_len must be in [2, seq_len={seq_len}], got {piece_len}")
        if shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {shuffle_window}")
        pieces = SplitIterDataset(parent, piece_len=piece_len, source_labels=source_labels)
        if shuffle_window:
            pieces = grain.experimental.WindowShuffleIterDataset(
                pieces, window_size=shuffle_window, seed=seed)
        super().__init__(pieces)
        self.seq_len, self.rows, self.piece_len = seq_len, rows, piece_len
        self.source_labels = tuple(source_labels)
        self.shuffle_window, self.doc_ids = shuffle_window, doc_ids

    def __iter__(self):
        return PackIterator(self._parent.__iter__(), seq_len=self.seq_len, rows=self.rows,
                            source_labels=self.source_labels, doc_ids=self.doc_ids)

    def __str__(self):
        return (f"PackIterDataset(rows={self.rows}, seq_len={self.seq_len}, "
                f"shuffle_window={self.shuffle_window})")


class PackIterator(grain.DatasetIterator):
    """Packs pieces (each at most ``seq_len`` tokens) first fit into ``rows x seq_len``."""

    def __init__(self, parent, *, seq_len: int, rows: int, source_labels: Sequence[str],
                 doc_ids: bool = False):
        super().__init__(parent)
        self._T, self._R = seq_len, rows
        self._keys = stat_keys(source_labels)
        self._doc_ids = doc_ids
        self._pending: dict | None = None  # the piece that did not fit in the last batch
        self._pending_state: dict | None = None  # parent state before it
        self._exhausted = False

    # -- checkpointing ------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"parent": copy.deepcopy(self._pending_state)}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"parent"}:  # the old packer's state had "pending", "piece", ...
            raise OldStateError(OLD_STATE_MESSAGE)
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state = None, None
        self._exhausted = False

    # -- packing --------------------------------------------------------------------------------
    def __next__(self):
        if self._exhausted:
            raise StopIteration
        R, T = self._R, self._T
        inputs = np.zeros((R, T), np.int32)
        targets = np.zeros((R, T), np.int32)
        weights = np.zeros((R, T), np.float32)
        positions = np.zeros((R, T), np.int32)
        segments = np.zeros((R, T), np.int32)
        docs = np.full((R, T), -1, np.int64) if self._doc_ids else None
        fill, nseg = [0] * R, [0] * R
        delta = dict.fromkeys(self._keys, 0)
        while True:
            if self._pending is None:
                self._pending_state = self._parent.get_state()
                try:
                    self._pending = next(self._parent)
                except StopIteration:
                    self._pending_state = None
                    self._exhausted = True
                    if not any(fill):
                        raise
                    break  # the last, partly filled batch
            piece = self._pending["tokens"]
            n = len(piece)
            if n:
                r = next((r for r in range(R) if fill[r] + n <= T), None)
                if r is None:
                    break  # the pending piece starts the next batch
                f = fill[r]
                inputs[r, f:f + n] = piece
                targets[r, f:f + n - 1] = piece[1:]
                weights[r, f:f + n - 1] = 1.0
                positions[r, f:f + n] = np.arange(n, dtype=np.int32)
                nseg[r] += 1
                segments[r, f:f + n] = nseg[r]
                if docs is not None:
                    docs[r, f:f + n] = self._pending["doc"]
                fill[r] = f + n
            for key in self._pending["count"]:
                delta[key] += 1
            self._pending = None
        used = sum(fill)
        delta.update(batches=1, segments=sum(nseg), tokens=used, padding_tokens=R * T - used,
                     target_tokens=int(weights.sum()))
        batch = {"inputs": inputs, "targets": targets, "weights": weights,
                 "positions": positions, "segment_ids": segments, "_stats": delta}
        if docs is not None:
            batch["doc_ids"] = docs
        return batch

    def __str__(self):
        return f"PackIterator(rows={self._R}, seq_len={self._T})"
