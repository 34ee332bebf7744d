"""The ScalingBench-style indicator and the downstream task (mcpm.tunnel.indicator / tasks):
losses and choices against a by-hand numpy computation on a tiny model, packing that changes no
row's loss, truncation, every bad input, the shipped sets and their generator, and the CLI."""
import argparse
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mcpm
from mcpm.api import params_of
from mcpm.checkpoint import save_checkpoint
from mcpm.cli import main as mcpm_main
from mcpm.config import ModelConfig, UserError
from mcpm.data.builtin_corpus import stdlib_root, stdlib_splits
from mcpm.tokenizer import Tokenizer, train_tokenizer
from mcpm.tunnel import indicator as ind
from mcpm.tunnel import tasks
from mcpm.tunnel.indicator import IndicatorError, indicator_loss
from mcpm.tunnel.tasks import downstream_accuracy

VOCAB = 512


class CharTokenizer:
    """One id per character (bos 1): token counts are character counts, by construction."""
    bos_id = 1

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, dim_model_base=8, initializer_range=0.3,
                      eos_token_id=(2,))
    return mcpm.MiniCPM4(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A 512-piece SentencePiece model trained on a few standard-library files."""
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(stdlib_splits(limit=60)["train"][:12], d, vocab_size=VOCAB,
                    max_sentences=5000)
    return d


ROWS = [
    {"question": "def add(a, b):", "reasoning": "    total = a + b\n",
     "answer": "    return total"},
    {"question": "x = 1\ny = 2\n", "reasoning": "z = x * y", "answer": "print(z)"},
    {"question": "", "reasoning": "", "answer": "import os"},
    {"question": "for i in range(3):\n", "reasoning": "", "answer": "    pass"},
    {"question": "class A:\n    pass\n", "reasoning": "a = A()\nb = A()\n", "answer": "a == b"},
]


@nnx.jit
def forward(model, ids):
    return model(ids)


def row_logprobs(model, ids):
    """float64 log-softmax of the model's logits on ``ids`` alone: [len(ids) - 1, V]. (Padded
    after the row to one length, so one compile serves every row: causal attention keeps the
    padding out of the row's logits.)"""
    n = len(ids) - 1
    x = np.zeros((1, 128), np.int32)
    x[0, :n] = ids[:-1]
    logits = np.asarray(forward(model, jnp.asarray(x)), np.float64)[0, :n]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def hand_row(model, question, parts, cut=0):
    """(NLL sum per scored part, token count per part) of one row, tokenized by hand with
    CharTokenizer: bos + question (+ newline) + each part (+ newline between), the question's
    first ``cut`` characters dropped."""
    texts = [question, *parts]
    for i in range(len(texts) - 1):   # the documented joining rule
        if texts[i] and not texts[i][-1].isspace() and any(texts[i + 1:]):
            texts[i] += "\n"
    tok = CharTokenizer()
    ids = tok.encode(texts[0][cut:])
    labels = [0] * len(ids)
    for k, t in enumerate(texts[1:], 1):
        ids += tok.encode(t, add_bos=False)
        labels += [k] * len(t)
    lp = row_logprobs(model, ids)
    sums, counts = np.zeros(len(parts) + 1), np.zeros(len(parts) + 1, int)
    for j in range(1, len(ids)):
        if labels[j]:
            sums[labels[j]] -= lp[j - 1, ids[j]]
            counts[labels[j]] += 1
    return sums, counts


def tol(n):
    # float32 logits: each token's NLL carries a rounding error of a few eps x its size
    # (~log V); packed and alone the reductions run in other orders, and a mean of n such
    # errors stays below their max (sqrt(n) is a generous bound on their accumulation)
    return 8 * np.finfo(np.float32).eps * math.log(VOCAB) * math.sqrt(n)


def test_indicator_counts_exactly_reasoning_and_answer_tokens(model):
    out = indicator_loss(model, CharTokenizer(), ROWS, batch_size=2, seq_len=64)
    hand = [hand_row(model, r["question"], [r["reasoning"], r["answer"]]) for r in ROWS]
    sums = np.array([s for s, _ in hand])
    counts = np.array([c for _, c in hand])
    # character tokens: the scored count is the characters of reasoning (+ its newline) + answer
    assert counts[:, 1].tolist() == [18, 10, 0, 0, 16]
    assert counts[:, 2].tolist() == [len(r["answer"]) for r in ROWS]
    assert out["tokens"] == counts.sum() and out["rows"] == len(ROWS)
    assert out["tokens_reasoning"] == counts[:, 1].sum()
    assert out["tokens_answer"] == counts[:, 2].sum()
    n = int(counts.sum())
    assert abs(out["loss"] - sums.sum() / n) < tol(n)
    assert abs(out["loss_reasoning"] - sums[:, 1].sum() / counts[:, 1].sum()) < tol(n)
    assert abs(out["loss_answer"] - sums[:, 2].sum() / counts[:, 2].sum()) < tol(n)
    np.testing.assert_allclose(out["row_losses"], sums.sum(1) / counts.sum(1), rtol=0,
                               atol=tol(n))
    assert out["truncated_rows"] == 0
    # a random model's loss is about log V, not zero: the comparison is not vacuous
    assert 0.5 * math.log(VOCAB) < out["loss"] < 3 * math.log(VOCAB)


def test_packing_changes_no_rows_loss_and_compiles_once(model):
    rows = ROWS * 4
    packed = ind.pack([ind.encode_row(ind.TextEncoder(CharTokenizer()), r["question"],
                                      [r["reasoning"], r["answer"]], seq_len=64, index=i)
                       for i, r in enumerate(rows)], 64, 2)
    assert packed["inputs"].shape[0] % 2 == 0 and packed["inputs"].shape[0] >= 4  # >= 2 batches
    assert max(len(set(s[s >= 0])) for s in packed["row_ids"]) >= 3   # rows share sequences
    # positions restart for every row; segment ids number the rows of a sequence
    seq = packed["row_ids"][0]
    for r in set(seq[seq >= 0]):
        assert packed["positions"][0][seq == r].tolist() == list(range((seq == r).sum()))
    before = ind._token_nll._cache_size()
    together = indicator_loss(model, CharTokenizer(), rows, batch_size=2, seq_len=64)
    assert ind._token_nll._cache_size() - before <= 1   # one compile for all batches
    for i, r in enumerate(ROWS):
        alone = indicator_loss(model, CharTokenizer(), [r], batch_size=2, seq_len=64)
        for k in (i, i + len(ROWS), i + 3 * len(ROWS)):
            assert abs(together["row_losses"][k] - alone["loss"]) < tol(64)


def test_sentencepiece_parts_join_like_text(sp_dir):
    tok = Tokenizer(sp_dir)
    enc = ind.TextEncoder(tok)
    q, r, a = "def f(x):\n", "    y = x + 1\n", "    return y"
    row = ind.encode_row(enc, q, [r, a], seq_len=100, index=0)
    assert tok.decode(row.ids) == q + r + a            # no space added at the part boundaries
    assert row.ids[0] == tok.bos_id
    parts = [row.ids[row.labels == k].tolist() for k in (0, 1, 2)]
    assert parts == [tok.encode(q), enc.continuation(r), enc.continuation(a)]
    # the answer's pieces spell it exactly: its 4-space indent did not become 5
    assert "".join(tok.sp.id_to_piece(parts[2])).replace("\u2581", " ") == a


def test_long_question_cut_from_the_left_and_too_long_row_refused(model):
    row = {"question": "a = 1\n" * 8, "reasoning": "b = 2\n", "answer": "c = 3"}
    n = 1 + 48 + 6 + 5
    out = indicator_loss(model, CharTokenizer(), [row], batch_size=1, seq_len=30)
    cut = n - 1 - 30
    sums, counts = hand_row(model, row["question"], [row["reasoning"], row["answer"]], cut=cut)
    assert out["truncated_rows"] == 1 and out["tokens"] == counts.sum() == 11
    assert abs(out["loss"] - sums.sum() / counts.sum()) < tol(11)
    # 11 scored tokens and bos need 11 positions plus one question token: 12 fit, 11 do not
    assert indicator_loss(model, CharTokenizer(), [row], batch_size=1, seq_len=12)["tokens"] == 11
    with pytest.raises(IndicatorError, match=r"row 1 is \d+ tokens long \(11 of them scored\)"
                                             r".*--seq-len 11.*at least 12"):
        indicator_loss(model, CharTokenizer(), [ROWS[2], row], batch_size=1, seq_len=11)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_indicator_data(tmp_path, model):
    good = json.dumps(ROWS[0])
    cases = [
        (tmp_path / "missing.jsonl", r"missing\.jsonl does not exist"),
        (write(tmp_path / "json.jsonl", [good, "{'question': 1}"]),
         r"json\.jsonl:2 \(row 1\): not valid JSON"),
        (write(tmp_path / "key.jsonl", [good, good, json.dumps({"question": "q", "answer": "a"})]),
         r"key\.jsonl:3 \(row 2\): no 'reasoning' field"),
        (write(tmp_path / "type.jsonl", [json.dumps({**ROWS[0], "answer": 4})]),
         r"type\.jsonl:1 \(row 0\): 'answer' is int, not a string"),
        (write(tmp_path / "obj.jsonl", ["[1, 2]"]), r"obj\.jsonl:1 \(row 0\): expected a JSON obj"),
        (write(tmp_path / "empty.jsonl", ["", "  "]), r"empty\.jsonl is empty"),
        (write(tmp_path / "blank.jsonl", [good, "", json.dumps({**ROWS[0], "reasoning": " ",
                                                                "answer": ""})]),
         r"blank\.jsonl:3 \(row 1\): reasoning and answer are both empty"),
    ]
    for path, message in cases:
        with pytest.raises(IndicatorError, match=message):
            ind.load_indicator_rows(path)
    assert issubclass(IndicatorError, UserError)
    with pytest.raises(IndicatorError, match=r"row 1: 'question' is NoneType"):
        indicator_loss(model, CharTokenizer(), [ROWS[0], {**ROWS[0], "question": None}])
    with pytest.raises(IndicatorError, match="no indicator rows"):
        indicator_loss(model, CharTokenizer(), [])
    with pytest.raises(IndicatorError, match="--seq-len must be at least 2"):
        indicator_loss(model, CharTokenizer(), ROWS, seq_len=1)


DOWN = [
    {"context": "def add(a, b):\n", "choices": ["    return a + b", "x", "    import sys",
                                                "while True: pass"], "answer": 0},
    {"context": "values = [1, 2, 3]\n", "choices": ["print(values)", "zz", "total = sum(values)",
                                                    "class B: pass"], "answer": 2},
    {"context": "import os\n" * 6, "choices": ["os.getcwd()", "p", "os.path.join(a, b)",
                                               "q = 1"], "answer": 3},
]


def test_downstream_accuracy_against_hand_computation(model):
    out = downstream_accuracy(model, CharTokenizer(), DOWN, batch_size=2, seq_len=40)
    given, prior, cut_rows = [], [], 0
    for r in DOWN:
        # the longest choice fixes one context cut for all four
        cut = max(0, max(1 + len(r["context"]) + len(c) - 1 - 40 for c in r["choices"]))
        cut_rows += cut > 0
        given.append([-hand_row(model, r["context"], [c], cut=cut)[0][1] for c in r["choices"]])
        prior.append([-hand_row(model, "\n", [c])[0][1] for c in r["choices"]])
    score = np.array(given) - np.array(prior)
    # totals, not means: each of up to 40 token NLLs may be off by the per-token bound, twice
    # for a difference of two totals
    bound = 40 * tol(1)
    np.testing.assert_allclose(out["choice_logliks"], given, rtol=0, atol=bound)
    np.testing.assert_allclose(out["choice_scores"], score, rtol=0, atol=2 * bound)
    preds = score.argmax(1).tolist()
    assert out["predictions"] == preds
    assert out["correct"] == sum(p == r["answer"] for p, r in zip(preds, DOWN))
    assert out["accuracy"] == out["correct"] / 3 and out["rows"] == 3
    total = np.array(given).argmax(1)
    assert out["accuracy_total"] == np.mean(total == [r["answer"] for r in DOWN])
    assert out["truncated_rows"] == cut_rows == 1 and out["chance"] == 0.25
    # the answers flipped to the hand predictions: accuracy 1
    right = [{**r, "answer": p} for r, p in zip(DOWN, preds)]
    assert downstream_accuracy(model, CharTokenizer(), right, seq_len=40)["accuracy"] == 1.0


def test_bad_downstream_data(tmp_path):
    good = DOWN[0]
    cases = [({**good, "choices": "abc"}, "'choices' must be a list of at least 2 strings"),
             ({**good, "choices": ["a", ""]}, "a choice is empty"),
             ({**good, "answer": 4}, r"'answer' must be an index into choices \(0\.\.3\), got 4"),
             ({**good, "answer": True}, "'answer' must be an index"),
             ({k: v for k, v in good.items() if k != "context"}, "no 'context' field")]
    for i, (row, message) in enumerate(cases):
        path = write(tmp_path / f"d{i}.jsonl", [json.dumps(good), json.dumps(row)])
        with pytest.raises(IndicatorError, match=rf"d{i}\.jsonl:2 \(row 1\): {message}"):
            tasks.load_downstream_rows(path)


def test_shipped_sets():
    rows = ind.load_indicator_rows("")
    assert 150 <= len(rows) <= 300
    for r in rows:
        assert all(isinstance(r[k], str) for k in ind.FIELDS)
        assert r["question"].endswith("\n") and r["reasoning"].endswith("\n")
        assert "\n" not in r["answer"] and len(r["answer"].strip()) >= tasks.MIN_ANSWER_CHARS
    down = tasks.load_downstream_rows("")
    assert 150 <= len(down) <= 300
    for r in down:
        assert len(r["choices"]) == 4 and r["answer"] in range(4)
        assert len(set(c.strip() for c in r["choices"])) == 4
    # the true line is at each place equally often
    assert np.bincount([r["answer"] for r in down], minlength=4).tolist() == [len(down) // 4] * 4
    assert sum(p.stat().st_size for p in ind.DATA_DIR.glob("*.jsonl")) < 400_000


def test_generator_is_deterministic_and_uses_validation_files_only(tmp_path):
    for d in ("a", "b"):
        assert tasks.main(["--out", str(tmp_path / d), "--indicator", "12",
                           "--downstream", "12"]) == 0
    for name in ("indicator.jsonl", "downstream.jsonl"):
        a, b = [(tmp_path / d / name).read_bytes() for d in ("a", "b")]
        assert a == b and len(a.splitlines()) == 12
    val = {f.relative_to(stdlib_root()).as_posix() for f in stdlib_splits()["validation"]}
    rows = [json.loads(x) for x in (tmp_path / "a" / "downstream.jsonl").read_text().splitlines()]
    for r in rows:
        name, line = r["source"].rsplit(":", 1)
        assert name in val
        text = (stdlib_root() / name).read_text(errors="replace").split("\n")
        assert r["choices"][r["answer"]] == text[int(line) - 1]
        assert r["context"].endswith(text[int(line) - 2] + "\n")


def test_code_line_flags():
    text = 'x = 1\n\n# note\n"""doc\nstring"""\nab\nif x:\n    y = "s"  # c\n'
    assert tasks.code_line_flags(text) == [True, False, False, False, False, False, True, True,
                                           False]


def test_commands_on_a_saved_checkpoint(tmp_path, sp_dir, model, capsys):
    ck = save_checkpoint(tmp_path / "ck", model.config, params_of(model), aux_dir=sp_dir)
    data = write(tmp_path / "rows.jsonl", [json.dumps(r) for r in ROWS])
    out = tmp_path / "res" / "ind.json"
    assert mcpm_main(["tunnel", "indicator", str(ck), str(data), "--batch-size", "2",
                      "--seq-len", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == len(ROWS) and res["loss"] > 0 and res["checkpoint"] == str(ck)
    assert "indicator loss" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["ind.json"]   # no temporary left
    args = argparse.Namespace(checkpoint=str(ck), data="", batch_size=8, out=str(tmp_path / "d"))
    assert tasks.downstream_command(args) == 0
    res = json.loads((tmp_path / "d").read_text())
    assert res["rows"] == len(tasks.load_downstream_rows()) and 0 <= res["accuracy"] <= 1
    assert "downstream accuracy" in capsys.readouterr().out
    # the shipped indicator set through the API the search calls
    res = ind.indicator_loss_of_checkpoint(ck)
    assert res["rows"] == len(ind.load_indicator_rows()) and res["tokens"] > 10 * res["rows"]
    # a checkpoint without its tokenizer: a user error naming the file
    bare = save_checkpoint(tmp_path / "bare", model.config, params_of(model))
    assert mcpm_main(["tunnel", "indicator", str(bare)]) == 2
    assert "has no tokenizer.model" in capsys.readouterr().err
