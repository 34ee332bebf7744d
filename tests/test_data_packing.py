"""Packing tokenized documents into train-step batches: layout, long-document pieces, resume."""
import json

import grain
import numpy as np
import pytest

from mcpm.data.packing import PackIterDataset, Tokenize, piece_starts

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


def _packed(docs, *, piece_len=T, rows=R, seq_len=T, events=None):
    elements = [{"tokens": d, "source": 0, "events": (events or {}).get(i, ())}
                for i, d in enumerate(docs)]
    ds = grain.MapDataset.source(elements).to_iter_dataset()
    return PackIterDataset(ds, seq_len=seq_len, rows=rows, piece_len=piece_len,
                           source_labels=["s"])


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


@pytest.mark.parametrize("piece_len", [T, 5])
def test_restore_mid_epoch_and_mid_document_gives_the_same_batches(piece_len):
    docs = _docs([5, 40, 3, 16, 7, 2, 33, 4, 6, 12, 9, 1 + T, 8] * 3, seed=1)
    reference = list(_packed(docs, piece_len=piece_len))
    assert len(reference) > 6
    it = iter(_packed(docs, piece_len=piece_len))
    for step in range(len(reference)):
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
        fresh = iter(_packed(docs, piece_len=piece_len))
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(reference) - step
        for got, want in zip(rest, reference[step:]):
            for k in ("inputs", "targets", "weights", "positions", "segment_ids"):
                np.testing.assert_array_equal(got[k], want[k])
        next(it)
    # counters are not repeated for a document re-read after a restore
    it = iter(_packed(docs, piece_len=piece_len))
    next(it), next(it)
    fresh = iter(_packed(docs, piece_len=piece_len))
    fresh.set_state(it.get_state())
    first = [next(it)["_stats"] for _ in range(2)]
    again = [next(fresh)["_stats"] for _ in range(2)]
    assert first == again


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
