"""The grain input pipeline on small generated corpora: determinism, resume, per-host shards,
mixtures, the pieces' window shuffle, every source format, bad data and empty sources."""
import json
import logging
import re

import numpy as np
import pytest

from mcpm.config import ConfigError, DataConfig, DataSourceConfig, from_dict
from mcpm.data import sources as sources_mod
from mcpm.data.packing import Tokenize
from mcpm.data.pipeline import batch_mix, make_dataset, make_iterator
from mcpm.data.sources import DataSourceError
from mcpm.tokenizer import Tokenizer, train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def class return import").split()
KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    lines = [f"<doc {i}> " + " ".join(rng.choice(WORDS, 12)) for i in range(2000)]
    (d / "train.txt").write_text("\n".join(lines))
    return str(train_tokenizer([d / "train.txt"], d, vocab_size=300))


def _text(i, rng, tag="doc"):
    return f"<{tag} {i}> " + " ".join(rng.choice(WORDS, int(rng.integers(2, 12))))


def write_jsonl(path, n, tag="doc", seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"text": _text(i, rng, tag)}) + "\n" for i in range(n)))
    return str(path)


def cfg_for(tok_path, *sources, **kw):
    srcs = tuple(s if isinstance(s, DataSourceConfig) else
                 DataSourceConfig(kind="files", paths=(s,)) for s in sources)
    kw = {"seq_len": 64, "batch_size": 4, "prefetch": 0, "read_threads": 0,
          "shuffle_window": 64, **kw}  # a small window: each fill re-reads it, keep tests fast
    return DataConfig(sources=srcs, tokenizer=tok_path, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def doc_ids(batches, tok_path, tag="doc"):
    """The documents (by their "<doc i>" marker) whose first piece is in ``batches``."""
    sp = Tokenizer(tok_path).sp
    ids = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                toks = b["inputs"][r][seg == s].tolist()
                m = re.match(rf"<{tag} (\d+)>", sp.decode([t for t in toks if t > 2]))
                if m and toks[0] == 1:  # bos: a document's first piece
                    ids.append(int(m.group(1)))
    return ids


# --------------------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_other_batches(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 60)
    cfg = cfg_for(tok_path, path, read_threads=2, prefetch=2)
    a, b = take(make_iterator(cfg), 12), take(make_iterator(cfg), 12)
    assert same(a, b)
    assert all(x[k].shape == (4, 64) for x in a for k in KEYS)
    assert a[0]["inputs"].dtype == np.int32 and a[0]["weights"].dtype == np.float32
    other = take(make_iterator(cfg_for(tok_path, path, seed=1)), 12)
    assert not same(a, other)


def test_resume_mid_epoch_gives_the_same_following_batches(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 40)
    cfg = cfg_for(tok_path, path, read_threads=2, prefetch=2)
    it = make_iterator(cfg)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint holds JSON
    expected, expected_stats = take(it, 15), it.stats()  # runs past the end of the 1st epoch
    restored = make_iterator(cfg)
    restored.set_state(state)
    assert same(take(restored, 15), expected)
    assert restored.stats() == expected_stats
    assert set(KEYS) == set(expected[0])  # the counters travel outside the batch
    # through grain's orbax checkpoint handler (what the trainer's CheckpointManager uses)
    import grain
    from etils import epath
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=restored)
    after = take(restored, 3)
    again = handler.restore(epath.Path(tmp_path), item=make_iterator(cfg))
    assert same(take(again, 3), after) and again.stats() == restored.stats()


def test_epochs_are_reshuffled_and_cover_every_document(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 30)
    cfg = cfg_for(tok_path, path, shuffle_window=0)  # pieces in order: epochs stay apart
    epoch1 = doc_ids(list(make_iterator(cfg, num_epochs=1)), tok_path)
    assert sorted(epoch1) == list(range(30))
    two = doc_ids(list(make_iterator(cfg, num_epochs=2)), tok_path)
    assert sorted(two[30:]) == list(range(30)) and two[:30] == epoch1 and two[30:] != epoch1
    unshuffled = doc_ids(list(make_iterator(cfg_for(tok_path, path, shuffle=False),
                                            num_epochs=1)), tok_path)
    assert sorted(unshuffled) == list(range(30)) and unshuffled != epoch1
    # with the window too: every document once per epoch
    windowed = cfg_for(tok_path, path)
    assert sorted(doc_ids(list(make_iterator(windowed, num_epochs=1)), tok_path)) == \
        list(range(30))
    assert sorted(doc_ids(list(make_iterator(windowed, num_epochs=2)), tok_path)) == \
        sorted(list(range(30)) * 2)


def test_hosts_read_disjoint_documents_that_together_are_all(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 41)
    cfg = cfg_for(tok_path, path)
    per_host = []
    for i in range(2):
        batches = list(make_iterator(cfg, process_index=i, process_count=2, num_epochs=1))
        assert all(b["inputs"].shape == (2, 64) for b in batches)  # batch_size / 2 rows
        per_host.append(doc_ids(batches, tok_path))
    assert not set(per_host[0]) & set(per_host[1])
    assert sorted(per_host[0] + per_host[1]) == list(range(41))
    # and infinitely: the same per-host streams, still disjoint within each epoch
    a = make_iterator(cfg, process_index=0, process_count=2)
    first = doc_ids(take(a, 8), tok_path)
    assert set(first) <= set(per_host[0])
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        make_iterator(cfg, process_index=0, process_count=3)


def test_mixture_follows_the_weights(tok_path, tmp_path):
    a = DataSourceConfig(kind="files", paths=(write_jsonl(tmp_path / "a.jsonl", 50, "a"),),
                         weight=3.0, label="A")
    b = DataSourceConfig(kind="files", paths=(write_jsonl(tmp_path / "b.jsonl", 50, "b", 1),),
                         weight=1.0, label="B")
    for window in (0, 64):
        it = make_iterator(cfg_for(tok_path, a, b, shuffle_window=window))
        batches = take(it, 40)
        stats = it.stats()
        na, nb = stats["documents/A"], stats["documents/B"]
        assert na + nb == stats["documents"] > 200
        assert abs(na / (na + nb) - 0.75) < 0.02
        # the documents really come from both sources, A's cycling through epochs (in order
        # without the window; a window holds many epochs of A and packs a random part of it)
        assert len(set(doc_ids(batches, tok_path, "a"))) >= (50 if window == 0 else 45)
        assert len(set(doc_ids(batches, tok_path, "b"))) > 40


def test_every_file_format(tok_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module as ar

    rng = np.random.default_rng(3)
    texts = [_text(i, rng) for i in range(12)]
    pq.write_table(pa.table({"body": texts[:4]}), tmp_path / "p.parquet", row_group_size=3)
    w = ar.ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    for t in texts[4:8]:
        w.write(t.encode())
    w.close()
    (tmp_path / "para.txt").write_text("\n\n".join(texts[8:11]) + "\n \n\n")
    (tmp_path / "whole.md").write_text(texts[11])
    for name, fmt, kw, want in [("p.parquet", "auto", {"text_key": "body"}, range(0, 4)),
                                ("r.array_record", "auto", {}, range(4, 8)),
                                ("para.txt", "txt", {"txt_document": "paragraph"}, range(8, 11)),
                                ("whole.md", "auto", {}, [11])]:
        src = DataSourceConfig(kind="files", paths=(str(tmp_path / name),), format=fmt, **kw)
        got = doc_ids(list(make_iterator(cfg_for(tok_path, src), num_epochs=1)), tok_path)
        assert sorted(got) == list(want), name
    # one glob over several formats (parquet needs its text_key, so leave it out here)
    src = DataSourceConfig(kind="files", paths=(str(tmp_path / "*.array_record"),
                                                str(tmp_path / "*.md")))
    got = doc_ids(list(make_iterator(cfg_for(tok_path, src), num_epochs=1)), tok_path)
    assert sorted(got) == [4, 5, 6, 7, 11]


def test_bad_data_is_counted_and_never_stops_the_run(tok_path, tmp_path, monkeypatch, caplog):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        (d / f"good{i}.txt").write_text(_text(i, rng))
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\t\n")
    (d / "latin1.txt").write_bytes(b"<doc 6> caf\xe9 na\xefve \xff\xfe")  # invalid UTF-8
    huge = " ".join(rng.choice(WORDS, 3000))  # ~ dozens of 64-token sequences
    (d / "huge.txt").write_text("<doc 7> " + huge)
    (d / "locked.txt").write_text("<doc 8> unreadable")
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "lines.jsonl").write_text(
        json.dumps({"text": "<doc 9> fine"}) + "\n{not json\n" + json.dumps({"title": "x"})
        + "\n[1, 2]\n" + json.dumps({"text": ""}) + "\n\n"
        + json.dumps({"text": "<doc 10> \u00ff"}, ensure_ascii=False) + "\n")
    real_read = sources_mod._read_bytes

    def read(path, *a, **k):  # root ignores chmod, so simulate "permission denied"
        if path.endswith("locked.txt"):
            raise PermissionError(13, "Permission denied", path)
        return real_read(path, *a, **k)
    monkeypatch.setattr(sources_mod, "_read_bytes", read)
    monkeypatch.setattr(sources_mod, "_warned", set())
    caplog.set_level(logging.WARNING, logger="mcpm.data")

    cfg = cfg_for(tok_path, str(d / "*"))
    epoch = make_iterator(cfg, num_epochs=1)
    batches = list(epoch)
    s = epoch.stats()
    assert sorted(set(doc_ids(batches, tok_path))) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert s["empty_documents"] == 3       # empty.txt, blank.txt, {"text": ""}
    assert s["invalid_utf8_documents"] == 1  # latin1.txt: decoded with replacement, used
    assert s["split_documents"] == 1       # huge.txt: split, not dropped
    assert s["bad_records"] == 3           # {not json, no "text" field, not an object
    assert s["unreadable_files"] == 2      # broken.parquet (at start), locked.txt (when read)
    assert s["documents"] == 10
    log = caplog.text
    assert "lines.jsonl:2: not valid JSON" in log and "lines.jsonl:3:" in log
    assert "lines.jsonl:4:" in log and "broken.parquet" in log and "locked.txt" in log
    assert re.search(r"latin1\.txt holds invalid UTF-8 .*replaced with U\+FFFD.*"
                     r"data_invalid_utf8_documents", log)
    # the huge document is all there: its pieces' trained transitions are all of its tokens
    assert s["target_tokens"] == s["tokens"] - s["segments"]
    # infinite: the run goes on through epochs; each epoch meets the bad data again
    it = make_iterator(cfg)
    take(it, 3 * len(batches))
    s2 = it.stats()
    assert s2["documents"] >= 2 * s["documents"] and s2["bad_records"] >= 2 * s["bad_records"]


def test_invalid_utf8_inside_jsonl_is_replaced(tok_path, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources_mod, "_warned", set())
    caplog.set_level(logging.WARNING, logger="mcpm.data")
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "<doc 3> caf\xe9"}\n'
                                       b'{"text": "<doc 4> na\xefve"}\n')
    it = make_iterator(cfg_for(tok_path, str(tmp_path / "x.jsonl")), num_epochs=1)
    batch = next(it)
    assert it.stats()["invalid_utf8_documents"] == 2
    assert "\ufffd" in Tokenizer(tok_path).decode(batch["inputs"][0])
    # warned once for the file, naming it and the first line
    warned = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
    assert len(warned) == 1 and "x.jsonl:1 holds invalid UTF-8" in warned[0]


def test_invalid_utf8_is_warned_once_per_file_for_every_format(tok_path, tmp_path, monkeypatch,
                                                                caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module as ar

    monkeypatch.setattr(sources_mod, "_warned", set())
    caplog.set_level(logging.WARNING, logger="mcpm.data")
    (tmp_path / "p.txt").write_bytes(b"<doc 0> caf\xe9\n\n<doc 1> na\xefve\n")
    pq.write_table(pa.table({"text": [b"<doc 2> \xff", b"<doc 3> \xfe"]}), tmp_path / "b.parquet")
    w = ar.ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    for t in (b"<doc 4> \xe9", b"<doc 5> \xe9"):
        w.write(t)
    w.close()
    for name, kw in [("p.txt", {"txt_document": "paragraph"}), ("b.parquet", {}),
                     ("r.array_record", {})]:
        src = DataSourceConfig(kind="files", paths=(str(tmp_path / name),), **kw)
        it = make_iterator(cfg_for(tok_path, src), num_epochs=1)
        list(it)
        assert it.stats()["invalid_utf8_documents"] == 2, name
        warned = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()
                  and name in r.getMessage()]
        assert len(warned) == 1, (name, warned)


def test_data_errors_are_user_errors_that_say_why(tok_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mcpm.config import UserError
    from mcpm.tokenizer import TokenizerError

    pq.write_table(pa.table({"body": ["<doc 0> alpha"]}), tmp_path / "t.parquet")
    with pytest.raises(DataSourceError) as e:
        make_iterator(cfg_for(tok_path, str(tmp_path / "t.parquet")))
    assert isinstance(e.value, UserError)
    assert re.search(r"no documents in 1 file\(s\) \(1 unreadable\).*the first problem: cannot "
                     r"read .*t\.parquet as parquet \(no column 'text'; its columns are "
                     r"\['body'\]: set text_key\)", str(e.value))
    (tmp_path / "a.txt").write_text("<doc 0> alpha")
    (tmp_path / "fake.model").write_text("not a tokenizer")
    cfg = cfg_for(tok_path, str(tmp_path / "a.txt"))
    with pytest.raises(TokenizerError, match=r"^data\.tokenizer: .*fake\.model: not a "
                                             r"SentencePiece model") as e:
        make_iterator(cfg.__class__(**{**cfg.__dict__, "tokenizer": str(tmp_path / "fake.model")}))
    assert isinstance(e.value, UserError)


def test_a_source_with_nothing_to_read_fails_at_the_start_naming_it(tok_path, tmp_path):
    with pytest.raises(DataSourceError, match=r"files:.*nothing\*\.txt.*no files match"):
        make_iterator(cfg_for(tok_path, str(tmp_path / "nothing*.txt")))
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text(" \n ")
    with pytest.raises(DataSourceError, match=r"all 2 of its documents are empty or unreadable"):
        make_iterator(cfg_for(tok_path, str(tmp_path / "e*.txt")))
    (tmp_path / "bad.jsonl").write_text("{oops\n{\"t\": 1}\n")
    with pytest.raises(DataSourceError, match="bad.jsonl"):
        make_iterator(cfg_for(tok_path, str(tmp_path / "bad.jsonl")))
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataSourceError, match=r"no documents in 1 file\(s\) \(1 unreadable\)"):
        make_iterator(cfg_for(tok_path, str(tmp_path / "x.parquet")))
    (tmp_path / "data.bin").write_text("hello")
    with pytest.raises(DataSourceError, match="cannot tell the format.*set format"):
        make_iterator(cfg_for(tok_path, str(tmp_path / "data.bin")))
    one = write_jsonl(tmp_path / "one.jsonl", 1)
    with pytest.raises(DataSourceError, match="fewer than the 2 processes"):
        make_iterator(cfg_for(tok_path, one, batch_size=2), process_index=1, process_count=2)
    tfds_src = DataSourceConfig(kind="tfds", name="no_such_dataset_xyz",
                                data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataSourceError, match="no_such_dataset_xyz.*array_record"):
        make_iterator(cfg_for(tok_path, tfds_src))


def test_mostly_empty_data_is_an_error_not_a_hang(tok_path, tmp_path, monkeypatch):
    import mcpm.data.packing as packing
    monkeypatch.setattr(packing, "MAX_SKIPPED_IN_A_ROW", 20)
    lines = [json.dumps({"text": "<doc 0> alpha"})] + [json.dumps({"text": ""})] * 30
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    it = make_iterator(cfg_for(tok_path, str(tmp_path / "m.jsonl"), shuffle=False))
    with pytest.raises(DataSourceError, match="20 documents in a row were empty"):
        take(it, 10)


def test_user_tfds_dataset_in_array_record_format(tok_path, tmp_path):
    import tensorflow_datasets as tfds

    class McpmTestNotes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"content": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 20),
                    "test": self._generate_examples(20, 25)}

        def _generate_examples(self, lo, hi):
            rng = np.random.default_rng(lo)
            for i in range(lo, hi):
                yield str(i), {"content": _text(i, rng), "n": i}

    McpmTestNotes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = DataSourceConfig(kind="tfds", name="mcpm_test_notes", split="train",
                           data_dir=str(tmp_path), text_key="content")
    got = doc_ids(list(make_iterator(cfg_for(tok_path, src), num_epochs=1)), tok_path)
    assert sorted(got) == list(range(20))
    src = DataSourceConfig(kind="tfds", name="mcpm_test_notes", split="test+train[:2]",
                           data_dir=str(tmp_path), text_key="content")
    got = doc_ids(list(make_iterator(cfg_for(tok_path, src), num_epochs=1)), tok_path)
    assert len(got) == 7 and set(range(20, 25)) <= set(got)
    wrong = DataSourceConfig(kind="tfds", name="mcpm_test_notes", data_dir=str(tmp_path))
    with pytest.raises(DataSourceError, match=r"no feature 'text'.*\['content', 'n'\]"):
        make_iterator(cfg_for(tok_path, wrong))


def test_data_config_is_checked_with_helpful_messages():
    cfg = from_dict(DataConfig, {"sources": [{"kind": "files", "paths": "a/*.jsonl",
                                              "weight": 2}], "seq_len": 128}, "data")
    assert cfg.sources[0].paths == ("a/*.jsonl",) and cfg.piece_len == 128
    bad = [({"sources": [{"kind": "file"}]}, r"data.sources\[0\].kind.*did you mean 'files'"),
           ({"sources": [{"kind": "files"}]}, r"data.sources\[0\].paths: a files source"),
           ({"sources": [{"kind": "tfds"}]}, r"data.sources\[0\].name"),
           ({"sources": [{"kind": "builtin", "split": "valid"}]}, "did you mean 'validation'"),
           ({"sources": [{"kind": "builtin", "paths": ["x"]}]}, "paths is not used by kind"),
           ({"sources": [{"weight": -1}]}, r"weight must be a positive"),
           ({"sources": [{"kind": "files", "paths": ["a"]}, {"kind": "files", "paths": ["a"]}]},
            "give one a different label"),
           ({"sources": []}, "data.sources is empty"),
           ({"max_doc_tokens": 600}, "max_doc_tokens"),
           ({"seq_lenn": 3}, "did you mean 'seq_len'"),
           ({"workers": -1}, "data.workers"),
           ({"shuffle_window": -1}, "data.shuffle_window must be >= 0")]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, data, "data")


def test_worker_processes_are_deterministic_and_resume(tok_path, tmp_path):
    """data.workers > 0: reading, tokenizing and packing in grain mp_prefetch worker processes
    (slow to start here: each worker imports jax and mcpm)."""
    path = write_jsonl(tmp_path / "a.jsonl", 40)
    cfg = cfg_for(tok_path, path, workers=1, prefetch=2)
    it = make_iterator(cfg)
    try:
        take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        expected, stats = take(it, 5), it.stats()
        it.set_state(state)  # restarts the worker from the checkpoint
        assert same(take(it, 5), expected) and it.stats() == stats
    finally:
        it.close()
    # one worker reads, tokenizes and packs exactly what the in-process pipeline does
    assert same(take(make_iterator(cfg_for(tok_path, path)), 8)[3:], expected)


# -- the pieces' window shuffle ------------------------------------------------------------------

def write_long_and_short(d, n_long=3, n_short=60, seed=0):
    """A files source of whole-file documents: a few long ones (~23 rows of 64 tokens each) and
    many short ones; each starts with its "<doc i>" marker. Returns its glob and the texts."""
    d.mkdir()
    rng = np.random.default_rng(seed)
    texts = {}
    for i in range(n_long + n_short):
        words = 300 if i < n_long else int(rng.integers(2, 30))
        texts[i] = f"<doc {i}> " + " ".join(rng.choice(WORDS, words))
        (d / f"{i:03d}.txt").write_text(texts[i])
    return str(d / "*.txt"), texts


def with_doc_ids(cfg, n=None, **kw):
    it = iter(make_dataset(cfg, doc_ids=True, **kw))
    try:
        return list(it) if n is None else take(it, n)
    finally:
        it.close()


def test_the_window_spreads_long_documents_and_mixes_batches(tok_path, tmp_path):
    glob, _ = write_long_and_short(tmp_path / "c", n_short=120)
    for window, mixed in ((0, False), (128, True)):
        cfg = cfg_for(tok_path, glob, shuffle_window=window, batch_size=8)
        batches = with_doc_ids(cfg, num_epochs=1)
        ids = [b["doc_ids"][b["doc_ids"] >= 0] for b in batches]
        sizes = {d: n for d, n in zip(*np.unique(np.concatenate(ids), return_counts=True))}
        longest = sorted(sizes, key=sizes.get)[-3:]  # the 3 long documents' numbers
        spread = [sum(d in i for i in ids) for d in longest]  # batches holding each
        rows = [-(-sizes[d] // 512) for d in longest]  # the fewest batches it fits in
        mix = batch_mix(cfg, len(batches) + 1, num_epochs=1)
        assert mix["batches"] == len(batches)
        assert mix["distinct"] == [len(np.unique(i)) for i in ids]
        if mixed:
            assert all(s >= 3 * r for s, r in zip(spread, rows)), (spread, rows)
            assert mix["max_share_max"] < 0.7 and mix["distinct_min"] >= 3
        else:  # in order: each long document fills consecutive whole batches
            assert all(s <= r + 1 for s, r in zip(spread, rows)), (spread, rows)
            assert mix["max_share_max"] == 1.0 and mix["distinct_min"] == 1


@pytest.mark.parametrize("window", [0, 64])
def test_every_target_token_is_trained_once_per_epoch(tok_path, tmp_path, window):
    glob, texts = write_long_and_short(tmp_path / "c", n_long=2, n_short=25)
    batches = with_doc_ids(cfg_for(tok_path, glob, shuffle_window=window, read_threads=2),
                           num_epochs=1)
    sp = Tokenizer(tok_path).sp
    trained, names = {}, {}  # per document number: its trained (input, target) pairs, its i
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                where = seg == s
                inp, tgt, w, doc = (b[k][r][where] for k in ("inputs", "targets", "weights",
                                                             "doc_ids"))
                assert len(set(doc.tolist())) == 1
                trained.setdefault(int(doc[0]), []).extend(
                    (int(a), int(t)) for a, t, ww in zip(inp, tgt, w) if ww)
                if inp[0] == 1:  # bos: the first piece names its document
                    names[int(doc[0])] = int(re.match(r"<doc (\d+)>",
                                                      sp.decode(inp[1:].tolist())).group(1))
    assert sorted(names.values()) == list(range(len(texts))) and set(names) == set(trained)
    tokenize = Tokenize(tok_path)
    for number, i in names.items():
        tokens = tokenize.map((0, (texts[i], None)))["tokens"].tolist()
        assert sorted(trained[number]) == sorted(zip(tokens[:-1], tokens[1:])), i


def test_resume_mid_window_and_mid_document_gives_the_same_batches(tok_path, tmp_path):
    glob, _ = write_long_and_short(tmp_path / "c", n_long=3, n_short=30)
    cfg = cfg_for(tok_path, glob, shuffle_window=48, read_threads=2, prefetch=2)
    reference = make_iterator(cfg)
    batches, states = [], []
    for _ in range(90):  # about two epochs
        states.append(json.loads(json.dumps(reference.get_state())))
        batches.append(next(reference))
    pack_states = [s["pipeline"]["parent"] for s in states]  # the window's state
    cuts = [k for k in np.random.default_rng(0).choice(85, 6, replace=False)]
    assert any(0 < pack_states[k]["pos_in_window"] < 48 for k in cuts)
    assert any(pack_states[k]["parent_window_start_state"]["piece"] > 0 for k in cuts)
    for k in cuts:
        it = make_iterator(cfg)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        assert state == states[k]
        expected, stats = take(it, 5), it.stats()
        assert same(expected, batches[k:k + 5])
        restored = make_iterator(cfg)
        restored.set_state(state)
        assert same(take(restored, 5), expected) and restored.stats() == stats
    # a changed window (or seed) gives other batches
    assert not same(take(make_iterator(cfg_for(tok_path, glob, shuffle_window=48, seed=1)), 20),
                    batches[:20])
    assert not same(take(make_iterator(cfg_for(tok_path, glob, shuffle_window=0)), 20),
                    batches[:20])


def test_unshuffled_data_keeps_its_pieces_in_order(tok_path, tmp_path):
    glob, _ = write_long_and_short(tmp_path / "c", n_long=2, n_short=10)
    ordered = list(make_iterator(cfg_for(tok_path, glob, shuffle=False, shuffle_window=0),
                                 num_epochs=1))
    assert same(list(make_iterator(cfg_for(tok_path, glob, shuffle=False, shuffle_window=64),
                                   num_epochs=1)), ordered)
    assert not same(list(make_iterator(cfg_for(tok_path, glob, shuffle_window=64),
                                       num_epochs=1)), ordered)


def test_a_data_state_from_the_old_pipeline_is_refused_saying_what_to_do(tok_path, tmp_path):
    from mcpm.config import UserError
    path = write_jsonl(tmp_path / "a.jsonl", 30)
    it = make_iterator(cfg_for(tok_path, path))
    # what the pipeline before data.shuffle_window saved (its packer's state, then counters)
    old = {"pipeline": {"parent": {"next_index": 10}, "pending": 1, "piece": 0, "bad_run": 0},
           "stats": {"batches": 2, "documents": 10, "segments": 12, "tokens": 428}}
    with pytest.raises(DataSourceError, match=r"data-iterator state is from an older data "
                                              r"pipeline.*mcpm train \.\.\. --restart-data") as e:
        it.set_state(old)
    assert isinstance(e.value, UserError)
    it.set_state(it.get_state())  # the current format restores
