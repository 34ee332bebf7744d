"""The training input pipeline: sources -> host shard -> shuffle -> mixture -> tokenize -> split
into pieces -> window shuffle of the pieces -> pack.

Built from grain's dataset API::

    per source:  MapDataset.source(documents)[process_index::process_count]   # host shard
                 .shuffle(seed_i).repeat()                                    # reshuffled per epoch
    MapDataset.mix(sources, weights)                                          # weighted mixture
      .map(Tokenize(tokenizer)).to_iter_dataset(ReadOptions(read_threads))    # parallel reads
    PackIterDataset(rows = batch_size / process_count, seq_len,               # packed batches:
                    shuffle_window)     # pieces of <= piece_len, shuffled in windows, packed
      .mp_prefetch(workers) | ThreadPrefetchIterDataset(prefetch)             # prefetch

Guarantees:

- Same config and seed -> the same batches. ``get_state()`` / ``set_state()`` (a JSON-serialisable
  dict holding grain's iterator state and the bad-data counters) restore an iterator mid-epoch
  (or mid-document, mid-window) so that it produces the same following batches. A state saved
  by an older layout of the pipeline (no ``"format": STATE_FORMAT``) is refused with a
  :class:`DataSourceError` that says to resume with ``--restart-data``.
- Mixing: documents are shuffled, split into pieces of at most ``piece_len`` tokens, and the
  pieces shuffled again within windows of ``data.shuffle_window`` pieces, so a long document is
  spread over many batches and a batch holds many documents (:func:`batch_mix` measures it).
  ``data.shuffle: false`` (evaluation) shuffles neither.
- Per-host: process i reads documents ``i, i + P, i + 2P, ...`` of every source, so within an
  epoch of a source the processes' documents are disjoint and together are all of its documents;
  each process packs its own ``batch_size / P`` rows (the rows of one step on all hosts are not
  the rows a single host would pack).
- Infinite: every source repeats, reshuffled each epoch (``num_epochs`` makes it finite: eval).
- Mixture weights are proportions of *documents* drawn from each source.
- Bad data never stops a run (see :mod:`mcpm.data.sources` and :data:`packing.STAT_KEYS`); its
  counters are in ``iterator.stats()``. A source with no usable document fails at the start
  with :class:`DataSourceError` naming it.
"""
from __future__ import annotations

import atexit
import logging
import weakref
from pathlib import Path
from typing import Any

import grain
import numpy as np

from mcpm.config import DataConfig, DataSourceConfig
from mcpm.data.packing import (DOC_KEY, OLD_STATE_MESSAGE, OldStateError, PackIterDataset,
                               Tokenize, stat_keys)
from mcpm.data.sources import (UNREADABLE_FILES, DataSourceError, DocumentSource,
                               open_builtin_source, open_files_source, open_tfds_source)

log = logging.getLogger("mcpm.data")

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
PROBE_DOCS = 1000  # documents read at the start to check that a source has some text
STATE_FORMAT = 2  # get_state()'s layout: 2 = pieces shuffled in windows (data.shuffle_window)


def cache_dir(cfg: DataConfig) -> Path:
    from mcpm.data.builtin_tfds import default_cache_dir
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def resolve_tokenizer(cfg: DataConfig) -> Path:
    """The SentencePiece model file: ``cfg.tokenizer`` or the built-in one (trained once)."""
    if not cfg.tokenizer:
        from mcpm.data.builtin_tfds import builtin_tokenizer
        return builtin_tokenizer(cache_dir(cfg), cfg.builtin_limit or None,
                                 cfg.builtin_vocab_size)
    path = Path(cfg.tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: no SentencePiece model at {path} (set "
                                "data.tokenizer='' for the built-in one)")
    return path


def open_source(src: DataSourceConfig, cfg: DataConfig) -> DocumentSource:
    """Index one configured source (raises :class:`DataSourceError` if it has no documents)."""
    label = src.display_name()
    if src.kind == "builtin":
        return open_builtin_source(src.split, label, cache_dir(cfg), cfg.builtin_limit or None)
    if src.kind == "tfds":
        return open_tfds_source(src.name, src.split, src.data_dir, src.text_key, label)
    return open_files_source(src.paths, label, fmt=src.format, txt_document=src.txt_document,
                             text_key=src.text_key)


def _probe(ds: grain.MapDataset, label: str, where: str) -> None:
    """Fail now, naming the source, if its first documents are all empty or unreadable."""
    n = min(len(ds), PROBE_DOCS)
    for i in range(n):
        payload, _ = ds[i]
        if payload is not None and payload.strip():
            return
    if n == len(ds):
        raise DataSourceError(f"data source {label}: all {n} of its documents{where} are empty "
                              "or unreadable (the warnings above name unreadable files and "
                              "records); check its files")
    log.warning("data source %s: its first %d documents%s are empty or unreadable", label, n,
                where)


def _seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


WINDOW_SEED_TAG = 1 << 20  # the pieces' window shuffle's seed: _seed(seed, this) (sources: 0..)


class _Tag:
    """Pairs a source's documents with the source's index (picklable for mp_prefetch)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, doc):
        return (self.index, doc)


def make_dataset(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None, doc_ids: bool = False) -> "StatsIterDataset":
    """The packed-batch ``grain.IterDataset`` for this process (see the module docstring).

    Opens and checks every source and the tokenizer now, so configuration and data problems
    surface before training starts. ``iter()`` of the result is a :class:`DataIterator`.
    ``doc_ids``: batches also hold ``"doc_ids"`` (each token's document number; measuring only,
    see :func:`batch_mix`).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size ({cfg.batch_size}) must be divisible by the number "
                         f"of processes ({process_count}): each process packs batch_size / "
                         "processes rows")
    tokenizer = resolve_tokenizer(cfg)
    from mcpm.tokenizer import Tokenizer, TokenizerError
    try:
        tok = Tokenizer(tokenizer)  # fails now on a bad model file
    except TokenizerError as e:
        raise TokenizerError(f"data.tokenizer: {e}") from None
    labels = [s.display_name() for s in cfg.sources]
    where = f" on process {process_index} of {process_count}" if process_count > 1 else ""
    per_source, initial = [], dict.fromkeys(stat_keys(labels), 0)
    for i, (src_cfg, label) in enumerate(zip(cfg.sources, labels)):
        src = open_source(src_cfg, cfg)
        initial[UNREADABLE_FILES] += src.unreadable_files
        ds = grain.MapDataset.source(src)[process_index::process_count]
        if not len(ds):
            raise DataSourceError(f"data source {label} has {len(src)} documents, fewer than the "
                                  f"{process_count} processes reading it")
        _probe(ds, label, where)
        if cfg.shuffle:
            ds = ds.shuffle(seed=_seed(cfg.seed, i))
        per_source.append(ds.repeat(num_epochs).map(_Tag(i)))
    weights = [s.weight for s in cfg.sources]
    mixed = per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, weights)
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=16 * cfg.read_threads)
    docs = mixed.map(Tokenize(str(tokenizer))).to_iter_dataset(read)
    ds = PackIterDataset(docs, seq_len=cfg.seq_len, rows=cfg.batch_size // process_count,
                         piece_len=cfg.piece_len, source_labels=labels,
                         shuffle_window=cfg.shuffle_window if cfg.shuffle else 0,
                         seed=_seed(cfg.seed, WINDOW_SEED_TAG) >> 2, doc_ids=doc_ids)
    if cfg.workers:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.workers, per_worker_buffer_size=max(1, cfg.prefetch)))
    elif cfg.prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return StatsIterDataset(ds, initial, tokenizer_path=tokenizer, vocab_size=tok.vocab_size)


def _absl_flags_parsed() -> None:
    """grain's ``mp_prefetch`` reads absl flags; outside an absl app they are unparsed (an error),
    so mark them parsed, leaving every flag at its default."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> "DataIterator":
    """An iterator of packed numpy batches (dicts of ``[batch_size / process_count, seq_len]``
    arrays: ``inputs``, ``targets``, ``positions``, ``segment_ids`` int32, ``weights`` float32)
    with ``get_state()``, ``set_state()`` and ``stats()``."""
    return iter(make_dataset(cfg, process_index=process_index, process_count=process_count,
                             num_epochs=num_epochs))


class StatsIterDataset(grain.IterDataset):
    """The pipeline's last stage: strips each batch's counters and sums them (state included)."""

    def __init__(self, parent: grain.IterDataset, initial: dict[str, int], *,
                 tokenizer_path: Path, vocab_size: int):
        super().__init__(parent)
        self.initial = dict(initial)
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size

    def __iter__(self) -> "DataIterator":
        return DataIterator(self._parent.__iter__(), self.initial,
                            tokenizer_path=self.tokenizer_path, vocab_size=self.vocab_size)


class DataIterator(grain.DatasetIterator):
    """Packed batches; ``stats()`` gives the cumulative counters (documents, tokens, padding and
    every kind of bad data), ``get_state()``/``set_state()`` checkpoint batches and counters."""

    def __init__(self, parent: grain.DatasetIterator, initial: dict[str, int], *,
                 tokenizer_path: Path, vocab_size: int):
        super().__init__(parent)
        self._stats_counts = dict(initial)
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size
        _LIVE.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        for key, value in batch.pop("_stats").items():
            self._stats_counts[key] += int(value)
        return batch

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the start of the run (restored with the state)."""
        return dict(self._stats_counts)

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "pipeline": self._parent.get_state(),
                "stats": dict(self._stats_counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OldStateError(OLD_STATE_MESSAGE)
        self._parent.set_state(state["pipeline"])
        saved = state.get("stats", {})
        self._stats_counts = {k: int(saved.get(k, 0)) for k in self._stats_counts}

    def __str__(self):
        return "DataIterator"


# Close live iterators (prefetch threads, worker processes) before the interpreter tears
# modules down; grain's own clean-up in __del__ fails noisily that late.
_LIVE: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
    for it in list(_LIVE):
        try:
            it.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        todo = [it]  # closed now: make the __del__ calls during teardown no-ops
        while todo:
            node = todo.pop()
            node.close = _noop
            todo.extend(getattr(node, "_parents", ()))


def _noop():
    pass


def batch_mix(cfg: DataConfig, num_batches: int = 200, *, process_index: int = 0,
              process_count: int = 1, num_epochs: int | None = None) -> dict[str, Any]:
    """How well the batches of ``cfg``'s pipeline mix documents, over its first ``num_batches``
    batches (of this process): per batch, the number of distinct documents with a token in it
    and the largest share of the batch's (non-padding) tokens that come from one document.

    Returns ``{"batches", "distinct": [per batch], "max_share": [per batch]}`` plus summaries
    (``distinct_min/median/mean``, ``max_share_mean/median/max``). Runs in this process
    (``workers`` and ``prefetch`` are ignored); a document read again in a later epoch counts
    as another document; ``num_epochs`` stops at the end of that many epochs. From a shell:
    ``python -m mcpm.data.pipeline CONFIG.yaml [NUM_BATCHES] [key=value ...]``.
    """
    import dataclasses
    cfg = dataclasses.replace(cfg, workers=0, prefetch=0)
    it = iter(make_dataset(cfg, process_index=process_index, process_count=process_count,
                           num_epochs=num_epochs, doc_ids=True))
    distinct, share = [], []
    try:
        for _ in range(num_batches):
            try:
                ids = next(it)["doc_ids"]
            except StopIteration:
                break
            _, counts = np.unique(ids[ids >= 0], return_counts=True)
            distinct.append(int(len(counts)))
            share.append(float(counts.max() / counts.sum()) if len(counts) else 0.0)
    finally:
        it.close()
    d, m = np.asarray(distinct or [0]), np.asarray(share or [0.0])
    return {"batches": len(distinct), "distinct": distinct, "max_share": share,
            "distinct_min": int(d.min()), "distinct_median": float(np.median(d)),
            "distinct_mean": float(d.mean()), "max_share_mean": float(m.mean()),
            "max_share_median": float(np.median(m)), "max_share_max": float(m.max())}


def _main(argv: list[str]) -> None:
    """``python -m mcpm.data.pipeline CONFIG.yaml [NUM_BATCHES] [key=value ...]``: batch_mix."""
    from mcpm.config import Config, load_config
    n = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 200
    overrides = [a for a in argv[1:] if "=" in a]
    cfg: Config = load_config(argv[0], overrides)
    mix = batch_mix(cfg.data, n)
    print(f"data.shuffle_window={cfg.data.shuffle_window} shuffle={cfg.data.shuffle} "
          f"seq_len={cfg.data.seq_len} batch_size={cfg.data.batch_size}: {mix['batches']} "
          f"batches; distinct documents per batch min {mix['distinct_min']} median "
          f"{mix['distinct_median']:g} mean {mix['distinct_mean']:.1f}; largest share of one "
          f"document mean {mix['max_share_mean']:.3f} median {mix['max_share_median']:.3f} "
          f"max {mix['max_share_max']:.3f}")


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])


__all__ = ["BATCH_KEYS", "DOC_KEY", "STATE_FORMAT", "DataIterator", "DataSourceError",
           "OldStateError", "batch_mix", "make_dataset", "make_iterator", "resolve_tokenizer",
           "open_source", "cache_dir"]
