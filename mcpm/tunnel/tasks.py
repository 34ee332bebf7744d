"""The shipped evaluation sets (indicator and downstream task) and the downstream accuracy.

Both sets are made from the built-in corpus' validation files (every 50th standard-library
source file, never trained on: :func:`mcpm.data.builtin_corpus.stdlib_splits`), so the whole
ModelTunnel chain (train proxies, indicator, downstream score, fit) runs offline. A fixed seed
makes generation deterministic on one Python; the standard library differs between Python
versions, so the files in ``mcpm/tunnel/data/`` are what users get by default::

    python -m mcpm.tunnel.tasks --out mcpm/tunnel/data

Lines. A line is *code* when it holds a token other than strings and comments (so blank lines,
comment-only lines, docstring lines and string tables are not) and has at least
``MIN_CODE_CHARS`` characters besides its indentation. Python's own :mod:`tokenize` decides.

``indicator.jsonl``: ``{"question", "reasoning", "answer", "source"}``. The question is 4-8
consecutive lines starting at a code line, the reasoning the next 2-4 lines and the answer the
line after them, all code lines, the answer at least ``MIN_ANSWER_CHARS`` long. The question and
the reasoning end with a newline; the answer has none.

``downstream.jsonl``: ``{"context", "choices", "answer", "source"}``: which of four lines
continues the code? The context is 6-10 consecutive lines (ending with a newline); the true next
line is a code line of at least ``MIN_ANSWER_CHARS`` characters; the three distractors are code
lines from *other* validation files whose length (without indentation) is within 20% of the true
line's, re-indented like the true line, so that neither indentation nor length gives the answer
away: names and syntax carried over from the context do. The true line is at each of the four
places equally often.

Within a set no line is scored twice (contexts may overlap other rows' lines), and no file
gives more than ``MAX_FILE_SHARE`` of a set, so the large files do not make the set theirs.

Downstream accuracy. Each choice's tokens are scored by the model given the context
(:mod:`mcpm.tunnel.indicator`'s tokenization, packing and jitted scoring: the choice is the one
scored part), and again given only a newline (``NEUTRAL_CONTEXT``: "a line of code"). A choice's
score is the difference of the two total log-likelihoods, log p(line | context) - log p(line),
how much the context raises the line's probability (domain-conditional PMI, Holtzman et al.
2021); the prediction is the best-scoring choice. Totals, not per-token means, because the
total is the log-probability of the whole line; the difference, because all four choices are
real code lines and their prior probability (common or rare tokens, token count) otherwise
outweighs what the context says. On the shipped set, the 150-step ``configs/tiny.yaml`` model
(held-out loss 4.4, indicator 4.3) picks 53.5% right by the difference but 26.5% by the plain
total and 23% by the per-token mean (chance: 25%); a 20-step one (indicator 6.4) is near chance
by all three (23-28%). The plain total's and
the per-token mean's accuracies are reported beside it (``accuracy_total``,
``accuracy_per_token``). When a context must be cut to fit ``seq_len``, all four choices get
the same cut context.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tokenize
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mcpm._files import write_json
from mcpm.tunnel.indicator import (DATA_DIR, IndicatorError, TextEncoder, _check_sizes, _fmt,
                                   check_rows, encode_row, load_model_and_tokenizer, read_jsonl,
                                   score_rows)

DOWNSTREAM_DATA = DATA_DIR / "downstream.jsonl"
INDICATOR_FILE, DOWNSTREAM_FILE = "indicator.jsonl", "downstream.jsonl"
SEED = 0
MIN_CODE_CHARS = 4
MIN_ANSWER_CHARS = 12
MAX_FILE_SHARE = 0.2
N_CHOICES = 4
LENGTH_TOLERANCE = 0.2
REINDENT = True
NEUTRAL_CONTEXT = "\n"


# -- reading the corpus ----------------------------------------------------------------------

def code_line_flags(text: str) -> list[bool]:
    """Per line of ``text``: whether it is a code line (see the module docstring)."""
    lines = text.split("\n")
    has_code = [False] * len(lines)
    skip = {tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENDMARKER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type not in skip:
                has_code[tok.start[0] - 1] = True
    except (tokenize.TokenError, SyntaxError):  # an unparsable file gives no lines
        return [False] * len(lines)
    return [c and len(line.strip()) >= MIN_CODE_CHARS for c, line in zip(has_code, lines)]


def _validation_files() -> list[tuple[str, list[str], list[bool]]]:
    """``(name, lines, code flags)`` of each validation file of the built-in corpus."""
    from mcpm.data.builtin_corpus import stdlib_root, stdlib_splits

    root = stdlib_root()
    out = []
    for f in stdlib_splits()["validation"]:
        text = f.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        out.append((f.relative_to(root).as_posix(), text.split("\n"), code_line_flags(text)))
    return out


def _pick_windows(files, n: int, rng: random.Random, make) -> list[dict]:
    """Up to ``n`` rows: ``make(file index, start, rng) -> (row, scored lines) or None`` at
    starts in random order; no line of a file is scored in two rows and a file gives at most
    ``MAX_FILE_SHARE`` of ``n`` rows. Rows come back in file and line order."""
    cap = max(1, int(MAX_FILE_SHARE * n))
    starts = [(i, s) for i, (_, lines, _) in enumerate(files) for s in range(len(lines))]
    rng.shuffle(starts)
    taken: list[set[int]] = [set() for _ in files]
    per_file = [0] * len(files)
    rows = []
    for i, s in starts:
        if len(rows) == n:
            break
        if per_file[i] >= cap:
            continue
        made = make(i, s, rng)
        if made is None:
            continue
        row, used = made
        if taken[i].intersection(used):
            continue
        taken[i].update(used)
        per_file[i] += 1
        rows.append((i, s, row))
    rows.sort(key=lambda r: r[:2])
    return [r for _, _, r in rows]


# -- the sets --------------------------------------------------------------------------------

def generate_indicator_rows(n: int = 200, *, seed: int = SEED, files=None) -> list[dict]:
    """The indicator set: question (4-8 lines), reasoning (next 2-4), answer (the line after)."""
    files = _validation_files() if files is None else files

    def make(i, s, rng):
        name, lines, code = files[i]
        k, m = rng.randint(4, 8), rng.randint(2, 4)
        a = s + k + m
        if a >= len(lines) or not code[s] or not all(code[s + k:a + 1]):
            return None
        if len(lines[a].strip()) < MIN_ANSWER_CHARS:
            return None
        row = {"question": "\n".join(lines[s:s + k]) + "\n",
               "reasoning": "\n".join(lines[s + k:a]) + "\n",
               "answer": lines[a], "source": f"{name}:{s + 1}"}
        return row, range(s + k, a + 1)

    return _pick_windows(files, n, random.Random(seed), make)


def generate_downstream_rows(n: int = 200, *, seed: int = SEED, files=None,
                             reindent: bool = REINDENT) -> list[dict]:
    """The downstream set: a 6-10 line context and four candidate next lines."""
    files = _validation_files() if files is None else files
    pool = {}   # stripped line -> (file index, the line as it is), first occurrence
    for i, (_, lines, code) in enumerate(files):
        for line, c in zip(lines, code):
            if c and len(line.strip()) >= MIN_ANSWER_CHARS:
                pool.setdefault(line.strip(), (i, line))
    pool = sorted((i, text, line) for text, (i, line) in pool.items())

    def make(i, s, rng):
        name, lines, code = files[i]
        k = rng.randint(6, 10)
        t = s + k
        if t >= len(lines) or not code[s] or not code[t]:
            return None
        true = lines[t]
        body = true.strip()
        if len(body) < MIN_ANSWER_CHARS:
            return None
        indent = true[: len(true) - len(true.lstrip())]
        tol = max(2, round(LENGTH_TOLERANCE * len(body)))
        near = [indent + text if reindent else line for j, text, line in pool
                if j != i and text != body and abs(len(text) - len(body)) <= tol]
        if len(near) < N_CHOICES - 1:
            return None
        choices = [true] + rng.sample(near, N_CHOICES - 1)
        row = {"context": "\n".join(lines[s:t]) + "\n", "choices": choices, "answer": 0,
               "source": f"{name}:{t + 1}"}
        return row, (t,)

    rng = random.Random(seed + 1)
    rows = _pick_windows(files, n, rng, make)
    # the true line's place: each of the four equally often, in random order
    places = [i % N_CHOICES for i in range(len(rows))]
    rng.shuffle(places)
    for row, at in zip(rows, places):
        row["choices"].insert(at, row["choices"].pop(0))
        row["answer"] = at
    return rows


def write_sets(out_dir: str | Path, *, n_indicator: int = 200, n_downstream: int = 200,
               seed: int = SEED) -> list[Path]:
    """Generate both sets into ``out_dir`` (JSONL, one row a line)."""
    files = _validation_files()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in ((INDICATOR_FILE, generate_indicator_rows(n_indicator, seed=seed,
                                                                files=files)),
                       (DOWNSTREAM_FILE, generate_downstream_rows(n_downstream, seed=seed,
                                                                  files=files))):
        path = out_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths


# -- downstream accuracy ---------------------------------------------------------------------

def check_downstream_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise IndicatorError(f"{where}: expected a JSON object with context, choices and "
                             f"answer, got {type(row).__name__}")
    for key in ("context", "choices", "answer"):
        if key not in row:
            raise IndicatorError(f"{where}: no {key!r} field; each row needs context (a string),"
                                 " choices (strings) and answer (the true choice's index)")
    if not isinstance(row["context"], str):
        raise IndicatorError(f"{where}: 'context' is {type(row['context']).__name__}, not a "
                             "string")
    choices = row["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)):
        raise IndicatorError(f"{where}: 'choices' must be a list of at least 2 strings")
    if any(not c.strip() for c in choices):
        raise IndicatorError(f"{where}: a choice is empty: nothing to score")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise IndicatorError(f"{where}: 'answer' must be an index into choices (0.."
                             f"{len(choices) - 1}), got {answer!r}")


def load_downstream_rows(path: str | Path = "") -> list[dict]:
    """Rows of a downstream JSONL file; ``""``: the set mcpm ships."""
    return read_jsonl(path or DOWNSTREAM_DATA, check_downstream_row, "downstream")


def downstream_accuracy(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 8,
                        seq_len: int = 512) -> dict:
    """Multiple-choice accuracy: the prediction is the choice whose total log-likelihood given
    the context exceeds its total given ``NEUTRAL_CONTEXT`` the most (see the module
    docstring). Returns ``accuracy``, ``rows``, ``correct``, ``chance``, ``accuracy_total``
    (by the plain total), ``accuracy_per_token`` (by the per-token mean), ``truncated_rows``,
    ``predictions`` and per row and choice ``choice_logliks`` (given the context) and
    ``choice_scores`` (the differences)."""
    _check_sizes(batch_size, seq_len)
    check_rows(rows, check_downstream_row, "downstream")
    enc = TextEncoder(tokenizer)
    encoded, truncated = [], set()
    for i, r in enumerate(rows):
        alone = [encode_row(enc, r["context"], [c], seq_len=seq_len, index=i)
                 for c in r["choices"]]
        cut = max(e.truncated for e in alone)
        if cut:
            truncated.add(i)
        # one context for all choices: each cut as much as the longest choice needs
        encoded += [e if e.truncated == cut else
                    encode_row(enc, r["context"], [c], seq_len=seq_len, index=i, min_cut=cut)
                    for e, c in zip(alone, r["choices"])]
        encoded += [encode_row(enc, NEUTRAL_CONTEXT, [c], seq_len=seq_len, index=i)
                    for c in r["choices"]]
    sums, counts = score_rows(model, encoded, batch_size=batch_size, seq_len=seq_len, n_parts=1)
    loglik, n_tok = -sums[:, 1], counts[:, 1]
    preds, preds_total, preds_mean, given, scores = [], [], [], [], []
    at = 0
    for r in rows:
        k = len(r["choices"])
        ll, prior, n = loglik[at:at + k], loglik[at + k:at + 2 * k], n_tok[at:at + k]
        at += 2 * k
        preds.append(int(np.argmax(ll - prior)))
        preds_total.append(int(np.argmax(ll)))
        preds_mean.append(int(np.argmax(ll / n)))
        given.append(ll.tolist())
        scores.append((ll - prior).tolist())
    answers = [r["answer"] for r in rows]
    right = lambda ps: sum(p == a for p, a in zip(ps, answers))
    return {"accuracy": right(preds) / len(rows), "rows": len(rows), "correct": right(preds),
            "chance": float(np.mean([1 / len(r["choices"]) for r in rows])),
            "accuracy_total": right(preds_total) / len(rows),
            "accuracy_per_token": right(preds_mean) / len(rows),
            "truncated_rows": len(truncated), "predictions": preds,
            "choice_logliks": given, "choice_scores": scores,
            "batch_size": batch_size, "seq_len": seq_len}


def downstream_accuracy_of_checkpoint(path: str | Path, data_path: str | Path = "",
                                      batch_size: int = 8, seq_len: int = 512) -> dict:
    """:func:`downstream_accuracy` of a checkpoint directory on a JSONL file (``""``: the
    shipped set)."""
    rows = load_downstream_rows(data_path)
    model, tokenizer = load_model_and_tokenizer(path)
    out = downstream_accuracy(model, tokenizer, rows, batch_size=batch_size, seq_len=seq_len)
    out.update(checkpoint=str(path), data=str(data_path or DOWNSTREAM_DATA))
    return out


def downstream_command(args) -> int:
    """``mcpm tunnel downstream CKPT [DATA.jsonl] [--batch-size B] [--out F]``."""
    out = downstream_accuracy_of_checkpoint(args.checkpoint, args.data,
                                            batch_size=args.batch_size,
                                            seq_len=getattr(args, "seq_len", 512))
    print(f"downstream accuracy {_fmt(out['accuracy'])} ({out['correct']} of {out['rows']} "
          f"rows; chance {_fmt(out['chance'])}; by the plain total log-likelihood "
          f"{_fmt(out['accuracy_total'])}, by its per-token mean "
          f"{_fmt(out['accuracy_per_token'])})")
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcpm.tunnel.tasks",
                                description="Generate the indicator and downstream sets from "
                                            "the built-in corpus' validation files.")
    p.add_argument("--out", required=True, help="folder for indicator.jsonl and downstream.jsonl")
    p.add_argument("--indicator", type=int, default=200, help="indicator rows")
    p.add_argument("--downstream", type=int, default=200, help="downstream rows")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    for path in write_sets(args.out, n_indicator=args.indicator, n_downstream=args.downstream,
                           seed=args.seed):
        rows = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"wrote {path} ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
