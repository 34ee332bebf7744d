"""Document sources: random-access sequences of raw documents for grain's ``MapDataset.source``.

Every source indexes its documents when it is opened (files are listed, counted and, for jsonl,
parquet and paragraph-split txt, scanned for record boundaries), so shuffling, host sharding and
checkpoints work on document indices. ``source[i]`` returns ``(payload, event)``: the document's
text (``str`` or undecoded ``bytes``) and ``None``, or ``(None, event)`` for a document that
could not be read, where ``event`` names the metrics counter (:data:`BAD_RECORDS`,
:data:`UNREADABLE_FILES`). Bytes that are not valid UTF-8 are replaced with U+FFFD and the
document is returned with the event :data:`INVALID_UTF8`. Nothing here raises for bad data once a
source is open; each problem is logged once per process with the file (and line or row) it
concerns (invalid UTF-8: once per file).

Files that cannot be opened or parsed when the source is indexed are skipped and counted in
``source.unreadable_files``; a source left with no documents at all raises
:class:`DataSourceError` naming it.

Readers are opened lazily and dropped when a source is pickled (grain ``mp_prefetch`` workers).
"""
from __future__ import annotations

import bisect
import collections
import glob
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mcpm.config import UserError

log = logging.getLogger("mcpm.data")

# event names = metrics counters
BAD_RECORDS = "bad_records"
UNREADABLE_FILES = "unreadable_files"
INVALID_UTF8 = "invalid_utf8_documents"

RawDoc = tuple[Any, "str | None"]


class DataSourceError(UserError, ValueError):
    """A source cannot produce any document (no files, nothing readable, no such dataset)."""


_warned: set = set()
_warn_lock = threading.Lock()


def warn_once(key, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("%s", message)


def decode_text(data: bytes, label: str, where: str, key=None) -> RawDoc:
    """``(text, None)``, or for invalid UTF-8 the text with U+FFFD replacements and
    :data:`INVALID_UTF8`, warned about once per ``key`` (default: ``where``, the file)."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        warn_once(("utf8", key if key is not None else where),
                  f"data source {label}: {where} holds invalid UTF-8 (first: byte "
                  f"{data[e.start:e.start + 1]!r} at offset {e.start} of a document); bad bytes "
                  "are replaced with U+FFFD and such documents are counted in "
                  f"data_{INVALID_UTF8}")
        return data.decode("utf-8", errors="replace"), INVALID_UTF8


class DocumentSource:
    """Base: ``len(source)`` documents; ``source[i]`` -> ``(payload, event)``."""

    label: str = "source"
    unreadable_files: int = 0  # files skipped when indexing
    first_problem: str = ""    # why the first skipped file was skipped (for error messages)

    def _skip_file(self, key, message: str) -> None:
        warn_once(key, message)
        self.unreadable_files += 1
        self.first_problem = self.first_problem or message

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawDoc:
        raise NotImplementedError

    def __repr__(self) -> str:  # grain prints sources in its errors and stats
        return f"{type(self).__name__}({self.label!r}, {len(self)} documents)"


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------

_FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".json": "jsonl", ".parquet": "parquet", ".array_record": "arrayrecord",
            ".arrayrecord": "arrayrecord"}
_TFDS_SHARD = re.compile(r"\.array_record-\d+-of-\d+$")


def detect_format(path: str | os.PathLike) -> str | None:
    """``txt``, ``jsonl``, ``parquet`` or ``arrayrecord`` from a file's name (None: unknown)."""
    name = os.path.basename(os.fspath(path)).lower()
    if _TFDS_SHARD.search(name):
        return "arrayrecord"
    return _FORMATS.get(os.path.splitext(name)[1])


def expand_globs(patterns: Sequence[str], label: str) -> list[str]:
    """Regular files matching ``patterns`` (``~``, ``**``), sorted per pattern, deduplicated."""
    out, seen = [], set()
    for pat in patterns:
        matches = sorted(m for m in glob.glob(os.path.expanduser(pat), recursive=True)
                         if os.path.isfile(m))
        if not matches:
            warn_once(("noglob", pat), f"data source {label}: the pattern {pat!r} matches no files")
        for m in matches:
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def _read_bytes(path: str, start: int = 0, length: int = -1) -> bytes:
    with open(path, "rb") as fh:
        if start:
            fh.seek(start)
        return fh.read(length)


class TxtFileSource(DocumentSource):
    """One document per text file."""

    def __init__(self, files: Sequence[str], label: str):
        self.label, self.files = label, list(files)
        self.unreadable_files = 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            return decode_text(_read_bytes(path), self.label, path)
        except OSError as e:
            warn_once(("read", path), f"data source {self.label}: cannot read {path} ({e}); "
                      "skipping it")
            return None, UNREADABLE_FILES


_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")


class _IndexedFiles(DocumentSource):
    """Documents at (file, byte range) positions found when indexing."""

    def __init__(self, files: Sequence[str], label: str):
        self.label = label
        self.unreadable_files = 0
        self.files: list[str] = []
        starts, lengths, lines, counts = [], [], [], []
        for path in files:
            try:
                s, n, ln = self._scan(path)
            except (OSError, ValueError) as e:
                self._skip_file(("index", path), f"data source {label}: cannot read {path} "
                                f"({e}); skipping the file")
                continue
            self.files.append(path)
            starts.append(s)
            lengths.append(n)
            lines.append(ln)
            counts.append(len(s))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        self.starts, self.lengths, self.lines = cat(starts), cat(lengths), cat(lines)
        self.first = np.cumsum([0] + counts)[:-1].tolist()  # first document of each file

    def _scan(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __len__(self):
        return len(self.starts)

    def _locate(self, index: int) -> tuple[str, int, int, int]:
        f = bisect.bisect_right(self.first, index) - 1
        return (self.files[f], int(self.starts[index]), int(self.lengths[index]),
                int(self.lines[index]))

    def _read(self, index: int) -> tuple[bytes | None, str, int]:
        path, start, length, line = self._locate(index)
        try:
            return _read_bytes(path, start, length), path, line
        except OSError as e:
            warn_once(("read", path), f"data source {self.label}: cannot read {path} ({e}); "
                      "skipping its documents")
            return None, path, line


class TxtParagraphSource(_IndexedFiles):
    """One document per blank-line-separated paragraph of text files."""

    def _scan(self, path):
        data = _read_bytes(path)
        starts, lengths, cuts = [], [], [0]
        for m in _PARAGRAPH_BREAK.finditer(data):
            cuts.extend((m.start(), m.end()))
        cuts.append(len(data))
        for s, e in zip(cuts[::2], cuts[1::2]):
            if data[s:e].strip():  # whitespace between paragraphs is not a document
                starts.append(s)
                lengths.append(e - s)
        n = len(starts)
        return (np.asarray(starts, np.int64), np.asarray(lengths, np.int64),
                np.zeros(n, np.int64))

    def __getitem__(self, index):
        data, path, _ = self._read(index)
        return decode_text(data, self.label, path) if data is not None else (None, UNREADABLE_FILES)


class JsonlSource(_IndexedFiles):
    """One document per line of JSON-lines files: the string at ``text_key`` of each object."""

    CHUNK = 1 << 24

    def __init__(self, files, label, text_key: str):
        self.text_key = text_key
        super().__init__(files, label)

    def _scan(self, path):
        ends, offset = [], 0
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(self.CHUNK)
                if not chunk:
                    break
                nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset
                ends.append(nl)
                offset += len(chunk)
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        if offset and (not len(ends) or ends[-1] != offset - 1):
            ends = np.append(ends, offset)  # last line without a newline
        ends = ends.astype(np.int64)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
        lengths = ends - starts
        lines = np.arange(1, len(ends) + 1, dtype=np.int64)
        keep = lengths > 0  # blank lines are not records ...
        one = np.flatnonzero(lengths == 1)
        if len(one):  # ... nor are "\r" lines (CRLF files)
            with open(path, "rb") as fh:
                for i in one:
                    fh.seek(int(starts[i]))
                    keep[i] = fh.read(1) != b"\r"
        return starts[keep], lengths[keep], lines[keep]

    def __getitem__(self, index):
        data, path, line = self._read(index)
        if data is None:
            return None, UNREADABLE_FILES
        text, event = decode_text(data, self.label, f"{path}:{line}", key=path)
        if not text.strip():
            return "", None
        try:
            obj = json.loads(text)
        except ValueError as e:
            warn_once(("json", path, line), f"data source {self.label}: {path}:{line}: not valid "
                      f"JSON ({e}); skipping the line")
            return None, BAD_RECORDS
        value = obj.get(self.text_key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            what = (f"has no string field {self.text_key!r}" if isinstance(obj, dict)
                    else "is not a JSON object")
            warn_once(("json", path, line), f"data source {self.label}: {path}:{line}: the line "
                      f"{what}; skipping it")
            return None, BAD_RECORDS
        return value, event


class ParquetSource(DocumentSource):
    """One document per row of parquet files: the ``text_key`` column (string or binary).

    Rows are read a row group at a time, with a few row groups cached per process; shuffled
    reading of parquet files with large row groups is slow, so convert big corpora to ArrayRecord.
    """

    CACHE = 4

    def __init__(self, files, label, text_key: str):
        import pyarrow.parquet as pq

        self.label, self.text_key = label, text_key
        self.unreadable_files = 0
        self.files, self.groups, starts = [], [], [0]  # groups: (file index, row group)
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
                names = meta.schema.names
                if text_key not in names:
                    raise ValueError(f"no column {text_key!r}; its columns are {names}: set "
                                     "text_key")
            except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for corrupt files
                self._skip_file(("index", path), f"data source {label}: cannot read {path} as "
                                f"parquet ({e}); skipping the file")
                continue
            self.files.append(path)
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self.groups.append((len(self.files) - 1, g))
                    starts.append(starts[-1] + rows)
        self.starts = starts
        self._init_cache()

    def _init_cache(self):
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache")
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self):
        return self.starts[-1]

    def _group(self, g: int) -> list | None:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        import pyarrow.parquet as pq

        f, rg = self.groups[g]
        path = self.files[f]
        try:
            values = pq.ParquetFile(path).read_row_group(rg, columns=[self.text_key]
                                                         ).column(0).to_pylist()
        except Exception as e:  # noqa: BLE001
            warn_once(("read", path, rg), f"data source {self.label}: cannot read row group {rg} "
                      f"of {path} ({e}); skipping its rows")
            values = None
        with self._lock:
            self._cache[g] = values
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return values

    def __getitem__(self, index):
        g = bisect.bisect_right(self.starts, index) - 1
        values = self._group(g)
        if values is None:
            return None, UNREADABLE_FILES
        value = values[index - self.starts[g]]
        if not isinstance(value, (str, bytes)):
            f, rg = self.groups[g]
            warn_once(("row", self.files[f], index), f"data source {self.label}: "
                      f"{self.files[f]} row {index - self.starts[g]} of row group {rg}: "
                      f"{self.text_key!r} is {type(value).__name__}; skipping the row")
            return None, BAD_RECORDS
        if isinstance(value, bytes):
            return decode_text(value, self.label, self.files[self.groups[g][0]])
        return value, None


class ArrayRecordSource(DocumentSource):
    """One document per record of ArrayRecord files (UTF-8 bytes)."""

    def __init__(self, files, label):
        from array_record.python import array_record_module as ar

        self.label = label
        self.unreadable_files = 0
        self.files, starts = [], [0]
        for path in files:
            reason = None
            try:
                if not os.access(path, os.R_OK):
                    raise PermissionError("permission denied")
                reader = ar.ArrayRecordReader(path)
                if not reader.ok():
                    reason = "not an ArrayRecord file"
                n = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001
                reason = str(e) or type(e).__name__
            if reason is not None:
                self._skip_file(("index", path), f"data source {label}: cannot read {path} "
                                f"({reason}); skipping the file")
                continue
            if n:
                self.files.append(path)
                starts.append(starts[-1] + n)
        self.starts = starts
        self._readers: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        from array_record.python import array_record_module as ar

        f = bisect.bisect_right(self.starts, index) - 1
        path = self.files[f]
        try:
            with self._lock:
                reader = self._readers.get(f)
                if reader is None:
                    reader = self._readers[f] = ar.ArrayRecordReader(
                        path, "readahead_buffer_size:0")
            data = reader.read([index - self.starts[f]])[0]
        except Exception as e:  # noqa: BLE001
            warn_once(("read", path), f"data source {self.label}: cannot read record "
                      f"{index - self.starts[f]} of {path} ({e}); skipping it")
            return None, BAD_RECORDS
        return decode_text(data, self.label, path)


class ConcatSource(DocumentSource):
    """Several sources as one (a files source whose globs match several formats)."""

    def __init__(self, parts: Sequence[DocumentSource], label: str):
        self.label, self.parts = label, list(parts)
        self.unreadable_files = sum(p.unreadable_files for p in parts)
        self.first_problem = next((p.first_problem for p in parts if p.first_problem), "")
        self.starts = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        k = bisect.bisect_right(self.starts, index) - 1
        return self.parts[k][index - self.starts[k]]


def open_files_source(patterns: Sequence[str], label: str, *, fmt: str = "auto",
                      txt_document: str = "file", text_key: str = "text") -> DocumentSource:
    files = expand_globs(patterns, label)
    if not files:
        raise DataSourceError(f"data source {label}: no files match {list(patterns)}")
    by_format: dict[str, list[str]] = {}
    for f in files:
        kind = fmt if fmt != "auto" else detect_format(f)
        if kind is None:
            raise DataSourceError(
                f"data source {label}: cannot tell the format of {f} from its name (known: "
                f"{sorted(set(_FORMATS))} and TFDS '*.array_record-NNNNN-of-NNNNN' shards); set "
                "format: txt|jsonl|parquet|arrayrecord")
        by_format.setdefault(kind, []).append(f)
    parts = []
    for kind, fs in by_format.items():
        if kind == "txt":
            parts.append(TxtFileSource(fs, label) if txt_document == "file"
                         else TxtParagraphSource(fs, label))
        elif kind == "jsonl":
            parts.append(JsonlSource(fs, label, text_key))
        elif kind == "parquet":
            parts.append(ParquetSource(fs, label, text_key))
        elif kind == "arrayrecord":
            parts.append(ArrayRecordSource(fs, label))
        else:  # pragma: no cover - the config restricts the formats
            raise DataSourceError(f"data source {label}: unknown format {kind!r}")
    src = parts[0] if len(parts) == 1 else ConcatSource(parts, label)
    src.label = label
    if not len(src):
        why = src.first_problem.removeprefix(f"data source {label}: ")
        raise DataSourceError(
            f"data source {label}: no documents in {len(files)} file(s)"
            + (f" ({src.unreadable_files} unreadable)" if src.unreadable_files else "")
            + f": {files[:5]}{' ...' if len(files) > 5 else ''}"
            + (f"; the first problem: {why}" if why else ""))
    return src


# --------------------------------------------------------------------------------------------
# TFDS (user datasets and the built-in corpus)
# --------------------------------------------------------------------------------------------

class TfdsSource(DocumentSource):
    """A TFDS dataset prepared in ArrayRecord format, read with random access (no TensorFlow).

    ``opener`` returns the TFDS data source (an ``ArrayRecordDataSource`` of feature dicts); it
    runs again in each process that reads the source.
    """

    def __init__(self, opener, label: str, text_key: str):
        self.label, self.text_key, self._opener = label, text_key, opener
        self.unreadable_files = 0
        self._ds = opener()
        self._len = len(self._ds)
        features = getattr(getattr(self._ds, "dataset_info", None), "features", None)
        keys = list(features.keys()) if hasattr(features, "keys") else None
        if keys is not None and text_key not in keys:
            raise DataSourceError(f"data source {label}: the dataset has no feature "
                                  f"{text_key!r}; its features are {keys} (set text_key)")
        if not self._len:
            raise DataSourceError(f"data source {label}: the split has no examples")
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self):
        return self._len

    def __getitem__(self, index):
        try:
            if self._ds is None:
                with self._lock:
                    if self._ds is None:
                        self._ds = self._opener()
            record = self._ds[index]
            value = record[self.text_key] if isinstance(record, dict) else record
        except Exception as e:  # noqa: BLE001
            warn_once(("tfds", self.label, index), f"data source {self.label}: cannot read "
                      f"example {index} ({type(e).__name__}: {e}); skipping it")
            return None, BAD_RECORDS
        if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
            value = value.item()
        if not isinstance(value, (bytes, str)):
            warn_once(("tfds-type", self.label), f"data source {self.label}: feature "
                      f"{self.text_key!r} is {type(value).__name__}, not text; skipping such "
                      "examples")
            return None, BAD_RECORDS
        if isinstance(value, bytes):
            return decode_text(value, self.label, f"example {index}", key=self.label)
        return value, None


class _UserTfds:
    """Picklable opener of a user's prepared TFDS dataset."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.name, self.split, self.data_dir = name, split, data_dir

    def __call__(self):
        import tensorflow_datasets as tfds

        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                    download=False)
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds
            where = self.data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
            raise DataSourceError(
                f"TFDS dataset {self.name!r} split {self.split!r} cannot be read from {where}: "
                f"{type(e).__name__}: {e}. Prepare it first in ArrayRecord format (e.g. `tfds "
                f"build {self.name} --file_format=array_record`), which random access needs"
            ) from None


class _BuiltinTfds:
    """Picklable opener of the prepared built-in corpus."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = data_dir, split

    def __call__(self):
        from mcpm.data.builtin_tfds import McpmStdlib

        return McpmStdlib(data_dir=self.data_dir).as_data_source(self.split)


def open_tfds_source(name: str, split: str, data_dir: str, text_key: str, label: str
                     ) -> TfdsSource:
    return TfdsSource(_UserTfds(name, split, data_dir or None), label, text_key)


def open_builtin_source(split: str, label: str, cache_dir: str | Path | None = None,
                        limit: int | None = None) -> TfdsSource:
    """The built-in corpus (prepared first if needed) as a source."""
    from mcpm.data.builtin_tfds import prepare_builtin_corpus

    builder = prepare_builtin_corpus(cache_dir, limit)
    data_dir = os.fspath(Path(os.fspath(builder.data_path)).parents[1])
    return TfdsSource(_BuiltinTfds(data_dir, split), label, "text")
