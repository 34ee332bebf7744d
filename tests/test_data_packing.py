"""Packing tokenized documents into train-step batches: layout, long-document pieces, the
pieces' window shuffle, resume."""
import itertools
import json

import grain
import numpy as np
import pytest

from mcpm.data.packing import PackIterDataset, Tokenize, piece_starts
from mcpm.data.sources import DataSourceError

T, R = 16, 3


def _docs(lengths, seed=0):
    """Random documents; each starts with a token naming it (1000 + its index)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 1000, size=n).astype(np.int32) for n in lengths]
    for i, d in enumerate(docs):
        d[:1] = 1000 + i
    return docs


def _by_document(segs):
    """Segments in document order (first fit spreads a batch's documents over its rows)."""
    return sorted(segs, key=lambda s: int(s[0][0]))


def _packed(docs, *, piece_len=T, rows=R, seq_len=T, events=None, window=0, seed=0,
            doc_ids=False):
    elements = [{"tokens": d, "source": 0, "events": (events or {}).get(i, ())}
                for i, d in enumerate(docs)]
    ds = grain.MapDataset.source(elements).to_iter_dataset()
    return PackIterDataset(ds, seq_len=seq_len, rows=rows, piece_len=piece_len,
                           source_labels=["s"], shuffle_window=window, seed=seed,
                           doc_ids=doc_ids)


def _segments(batch):
    """Every packed segment: (inputs, targets, weights, positions) per (row, segment id)."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))  # 1, 2, ... in order
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            out.append(tuple(batch[k][r, where] for k in ("inputs", "targets", "weights",
                                                           "positions")))
        pad = seg == 0
        assert not batch["inputs"][r, pad].any() and not batch["weights"][r, pad].any()
        assert not batch["positions"][r, pad].any() and not batch["targets"][r, pad].any()
        if pad.any():  # padding only at the end of a row
            assert pad[np.argmax(pad):].all()
    return out


def test_piece_starts_overlap_by_one_token():
    assert list(piece_starts(5, 8)) == [0]
    assert list(piece_starts(8, 8)) == [0]
    assert list(piece_starts(9, 8)) == [0, 7]
    assert list(piece_starts(15, 8)) == [0, 7]  # 0..7, 7..14
    assert list(piece_starts(16, 8)) == [0, 7, 14]
    assert list(piece_starts(5, 2)) == [0, 1, 2, 3]


def test_batch_layout_shifts_weights_positions_segments():
    lengths = [5, 9, 3, 16, 7, 2, 11, 4, 6]
    docs = _docs(lengths)
    batches = list(_packed(docs))
    segs = []
    for b in batches:
        assert set(b) == {"inputs", "targets", "weights", "positions", "segment_ids", "_stats"}
        assert all(b[k].shape == (R, T) for k in b if k != "_stats")
        assert b["weights"].dtype == np.float32 and b["inputs"].dtype == np.int32
        segs += _segments(b)
    # no document is split (all <= T): each segment is one whole document
    assert len(segs) == len(docs)
    for doc, (inp, tgt, w, pos) in zip(docs, _by_document(segs)):
        assert np.array_equal(inp, doc)
        assert np.array_equal(tgt[:-1], doc[1:]) and tgt[-1] == 0  # next token, same doc
        assert np.array_equal(w, [1.0] * (len(doc) - 1) + [0.0])    # 0 at the doc's last token
        assert np.array_equal(pos, np.arange(len(doc)))             # restart per document
    total = {k: sum(b["_stats"][k] for b in batches) for k in batches[0]["_stats"]}
    assert total["documents"] == total["segments"] == len(docs)
    assert total["tokens"] == sum(lengths)
    assert total["target_tokens"] == sum(n - 1 for n in lengths)
    assert total["padding_tokens"] == len(batches) * R * T - sum(lengths)
    assert total["batches"] == len(batches) and total["documents/s"] == len(docs)


def test_long_documents_are_split_into_overlapping_pieces():
    lengths = [50, 4, 23]
    docs = [np.arange(n, dtype=np.int32) + 1000 * (i + 1) for i, n in enumerate(lengths)]
    batches = list(_packed(docs, piece_len=8))
    segs = [s for b in batches for s in _segments(b)]
    assert max(len(s[0]) for s in segs) == 8
    for i, doc in enumerate(docs):
        # this document's pieces, in order of their first token (token = 1000 (i+1) + offset)
        pieces = sorted((s for s in segs if s[0][0] // 1000 == i + 1), key=lambda s: s[0][0])
        assert [int(p[0][0]) - doc[0] for p in pieces] == list(piece_starts(len(doc), 8))
        for inp, tgt, w, pos in pieces:
            assert np.array_equal(pos, np.arange(len(inp)))  # positions restart per piece
            assert w[-1] == 0 and w[:-1].all()
        # stitched back (each piece after the first repeats the previous one's last token) ...
        joined = np.concatenate([pieces[0][0]] + [p[0][1:] for p in pieces[1:]])
        assert np.array_equal(joined, doc)
        # ... and every next-token transition of the document is trained exactly once
        pairs = [(int(a), int(b)) for inp, tgt, w, _ in pieces
                 for a, b, ww in zip(inp, tgt, w) if ww]
        assert pairs == list(zip(doc[:-1].tolist(), doc[1:].tolist()))
    stats = {key: sum(b["_stats"][key] for b in batches) for key in batches[0]["_stats"]}
    assert stats["split_documents"] == 2 and stats["documents"] == 3
    assert stats["segments"] == len(segs)


def test_events_and_empty_documents_are_counted_not_packed():
    docs = _docs([5, 0, 6, 0, 4])
    events = {1: ("empty_documents",), 2: ("invalid_utf8_documents",), 3: ("bad_records",)}
    batches = list(_packed(docs, events=events))
    stats = {k: sum(b["_stats"][k] for b in batches) for k in batches[0]["_stats"]}
    assert stats["documents"] == 3 and stats["empty_documents"] == 1
    assert stats["invalid_utf8_documents"] == 1 and stats["bad_records"] == 1


@pytest.mark.parametrize("piece_len,window", [(T, 0), (5, 0), (5, 24), (T, 10)])
def test_restore_mid_epoch_and_mid_document_gives_the_same_batches(piece_len, window):
    docs = _docs([5, 40, 3, 16, 7, 2, 33, 4, 6, 12, 9, 1 + T, 8] * 3, seed=1)
    events = {2: ("invalid_utf8_documents",), 20: ("bad_records",)}
    docs[20] = docs[20][:0]  # an unusable document: only its event is counted

    def packed():
        return _packed(docs, piece_len=piece_len, window=window, events=events)
    reference = list(packed())
    assert len(reference) > 6
    it = iter(packed())
    mid_window = mid_document = 0
    for step in range(len(reference)):
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
        split = state["parent"]["parent_window_start_state"] if window else state["parent"]
        mid_document += split["piece"] > 0
        mid_window += bool(window) and 0 < state["parent"]["pos_in_window"] < window
        fresh = iter(packed())
        fresh.set_state(state)
        # the next 3 batches; from every 5th step all the rest, to the end of the data
        to_end = step % 5 == 2
        rest = list(fresh) if to_end else list(itertools.islice(fresh, 3))
        assert len(rest) == (len(reference) - step if to_end else min(3, len(reference) - step))
        for got, want in zip(rest, reference[step:]):
            for k in ("inputs", "targets", "weights", "positions", "segment_ids", "_stats"):
                np.testing.assert_equal(got[k], want[k])  # the counters too: once each
        next(it)
    assert mid_document and (mid_window or not window)
    total = {k: sum(b["_stats"][k] for b in reference) for k in reference[0]["_stats"]}
    assert total["documents"] == len(docs) - 1 and total["bad_records"] == 1
    assert total["invalid_utf8_documents"] == 1


def _trained_pairs(batches, key=None):
    """(input, target) of every token with weight 1; per document (its first token) with key."""
    out = {}
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                inp, tgt, w = (b[k][r][seg == s] for k in ("inputs", "targets", "weights"))
                doc = key(b, r, seg == s) if key else 0
                out.setdefault(doc, []).extend(
                    (int(a), int(t)) for a, t, ww in zip(inp, tgt, w) if ww)
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("window", [0, 16])
def test_every_target_is_trained_exactly_once_with_and_without_the_window(window):
    docs = [np.arange(n, dtype=np.int32) + 1000 * (i + 1)  # token = 1000 (doc + 1) + offset
            for i, n in enumerate([120, 3, 57, 9, 2, 16, 17, 200, 5, 31])]
    batches = list(_packed(docs, piece_len=8, window=window, doc_ids=True))
    got = _trained_pairs(batches, key=lambda b, r, where: int(b["doc_ids"][r][where][0]))
    assert sorted(got) == list(range(len(docs)))  # doc_ids: the documents' numbers
    for i, doc in enumerate(docs):
        assert got[i] == list(zip(doc[:-1].tolist(), doc[1:].tolist())), i
    assert sum(b["_stats"]["documents"] for b in batches) == len(docs)


def test_the_window_spreads_long_documents_over_batches():
    docs = [np.full(300, 1000 + i, np.int32) for i in range(3)]        # 3 long documents
    docs += [np.full(6, 2000 + i, np.int32) for i in range(200)]       # 200 short ones
    order = np.random.default_rng(0).permutation(len(docs))
    docs = [docs[i] for i in order]

    def mix(window, seed=0):
        batches = list(_packed(docs, piece_len=T, rows=4, window=window, seed=seed))
        per_batch = [np.unique(b["inputs"][b["segment_ids"] > 0], return_counts=True)
                     for b in batches]
        longs = [{int(t) for t in ids if t < 2000} for ids, _ in per_batch]
        spread = [sum(1000 + i in ls for ls in longs) for i in range(3)]
        return batches, [len(ids) for ids, _ in per_batch], \
            [c.max() / c.sum() for _, c in per_batch], spread
    batches, distinct, share, spread = mix(0)
    assert sum(s == 1 for s in share) >= 9  # whole batches of one document
    assert max(spread) <= 6  # a long document's 20 pieces: 5 or 6 consecutive batches
    batches, distinct, share, spread = mix(64)
    assert max(share) < 0.9 and min(distinct) >= 2  # no batch is one document
    assert min(spread) >= 9  # each long document's pieces are in many batches
    # seeded: the same seed gives the same batches, another seed others
    again, other = mix(64)[0], mix(64, seed=1)[0]
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again))
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, other))


def test_an_old_packer_state_is_refused_with_a_clear_error():
    it = iter(_packed(_docs([5, 9, 3])))
    with pytest.raises(DataSourceError, match=r"older data pipeline.*--restart-data"):
        it.set_state({"parent": {"next_index": 10}, "pending": 1, "piece": 0, "bad_run": 0})


def test_tokenize_decodes_invalid_utf8_and_flags_empty(tmp_path):
    from mcpm.tokenizer import train_tokenizer
    lines = [f"line {i} with some words and symbols ()[]" for i in range(300)]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    path = train_tokenizer([tmp_path / "t.txt"], tmp_path, vocab_size=300)
    tok = Tokenize(str(path))
    out = tok.map((0, (b"line 1 ok", None)))
    assert out["tokens"][0] == 1 and out["tokens"][-1] == 2 and out["events"] == ()
    bad = tok.map((1, (b"line \xff\xfe 2", None)))
    assert bad["events"] == ("invalid_utf8_documents",) and len(bad["tokens"]) > 3
    assert tok.map((0, (" \n\t", None)))["events"] == ("empty_documents",)
    assert tok.map((0, (None, "bad_records")))["events"] == ("bad_records",)
    # texts longer than the encoder's chunk are encoded piecewise, nothing is lost
    import mcpm.data.packing as packing
    text = "\n".join(lines[:50])
    whole = tok.map((0, (text, None)))["tokens"]
    old, packing.MAX_ENCODE_CHARS = packing.MAX_ENCODE_CHARS, 100
    try:
        chunked = tok.map((0, (text, None)))["tokens"]
    finally:
        packing.MAX_ENCODE_CHARS = old
    sp = tok._tokenizer().sp
    assert sp.decode(chunked[1:-1].tolist()) == sp.decode(whole[1:-1].tolist()) == text
