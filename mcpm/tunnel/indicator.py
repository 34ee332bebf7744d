"""The ScalingBench-style indicator of ModelTunnel v2: a model's loss on written-out reasoning and
the answer, given the question.

Data: JSONL rows ``{"question": str, "reasoning": str, "answer": str}``. By default the set mcpm
ships (``mcpm/tunnel/data/indicator.jsonl``, made by :mod:`mcpm.tunnel.tasks` from the built-in
corpus' validation files): the question is a few lines of code, the reasoning the lines that
follow, the answer the next line.

Tokenization. Each part is tokenized on its own and the ids are concatenated::

    ids = tokenizer.encode(question)          # bos + the question, as a prompt is encoded
        + continuation(reasoning + sep)       # no dummy-prefix space: the ids decode to the
        + continuation(answer)                # parts' text joined exactly

``sep`` is a newline, added after a part when a later part is non-empty and the part does not
already end in whitespace (the question gets the same). Tokenizing the parts separately (rather
than the joined text once) puts a token boundary at each part boundary, so every token belongs to
exactly one part and the question's tokens never hold reasoning text; joined at line ends, as the
shipped sets are, the ids are the ones the joined text would get.

Scoring. The target at each position is the next token; a position has weight 1 when its target
is a reasoning or answer token (the question's tokens are only context; the first reasoning
token, predicted from the question's last token, counts). The indicator is the token-weighted
mean negative log-likelihood (nats/token) over all rows; ``loss_reasoning`` / ``loss_answer`` are
the same means over each part's tokens alone.

Batching. Rows are packed first fit, several to a sequence of ``seq_len`` positions (a row of n
tokens takes n - 1 positions: its last token is only a target), each with its own segment id
(attention never crosses rows) and positions restarting at 0, so a row's loss is the same as
when it is run alone. Batches are ``[batch_size, seq_len]`` (the last one padded with empty
sequences) and all go through one jitted function, compiled once per model and shape. It returns
every position's NLL; the sums per row and part are made on the host in float64. The logits are
made ``LOGIT_CHUNK`` positions at a time, so a large vocabulary never needs ``B x T x V`` floats.

A row too long for ``seq_len`` loses question tokens from the left (after bos; the end of the
question, next to what is scored, stays). When not even one question token would remain the row
is refused with an error that names it.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm._files import write_json
from mcpm.config import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
INDICATOR_DATA = DATA_DIR / "indicator.jsonl"
FIELDS = ("question", "reasoning", "answer")
PARTS = ("reasoning", "answer")   # scored parts: labels 1 and 2 (0 = context)
LOGIT_CHUNK = 128                 # positions whose logits exist at once


class IndicatorError(UserError, ValueError):
    """Unusable indicator or downstream data (file, JSON, fields) or a row that cannot fit."""


# -- reading ---------------------------------------------------------------------------------

def read_jsonl(path: str | Path, check: Callable[[Any, str], None], what: str) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped), each passed to ``check(row, where)``
    (``where``: ``"FILE:LINE (row I)"``), which raises :class:`IndicatorError` for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise IndicatorError(f"{what} data {path} does not exist (or is not a file); give a "
                             "JSONL file, or no path for the set mcpm ships")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno} (row {len(rows)})"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise IndicatorError(f"{where}: not valid JSON ({e.msg} at column "
                                         f"{e.colno}); each line must be one JSON object"
                                         ) from None
                check(row, where)
                rows.append(row)
    except UnicodeDecodeError as e:
        raise IndicatorError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise IndicatorError(f"{what} data {path} is empty: it has no JSON rows")
    return rows


def check_indicator_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise IndicatorError(f"{where}: expected a JSON object with question, reasoning and "
                             f"answer strings, got {type(row).__name__}")
    for key in FIELDS:
        if key not in row:
            raise IndicatorError(f"{where}: no {key!r} field; each row needs question, "
                                 "reasoning and answer strings")
        if not isinstance(row[key], str):
            raise IndicatorError(f"{where}: {key!r} is {type(row[key]).__name__}, not a string")
    if not (row["reasoning"] + row["answer"]).strip():
        raise IndicatorError(f"{where}: reasoning and answer are both empty: nothing to score")


def check_rows(rows: Sequence[Any], check: Callable[[Any, str], None], what: str) -> None:
    """``check`` every row of an in-memory list (``where`` = ``"row I"``)."""
    if not rows:
        raise IndicatorError(f"no {what} rows given")
    for i, row in enumerate(rows):
        check(row, f"row {i}")


def load_indicator_rows(path: str | Path = "") -> list[dict]:
    """Rows of an indicator JSONL file; ``""``: the set mcpm ships."""
    return read_jsonl(path or INDICATOR_DATA, check_indicator_row, "indicator")


# -- tokenizing ------------------------------------------------------------------------------

class TextEncoder:
    """``context(text)``: bos + ids, as ``tokenizer.encode`` makes a prompt's; ``continuation
    (text)``: ids of text that follows other text, so SentencePiece's dummy-prefix space is left
    out (the ids of consecutive parts decode to their text joined exactly).

    ``tokenizer``: a :class:`mcpm.tokenizer.Tokenizer`, or any object with ``encode(text,
    add_bos=True)`` and ``bos_id`` (continuations are then ``encode(text, add_bos=False)``).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sp = getattr(tokenizer, "sp", None)
        self._cont = (_without_dummy_prefix(sp).encode if sp is not None
                      else functools.partial(tokenizer.encode, add_bos=False))

    def context(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def continuation(self, text: str) -> list[int]:
        return list(self._cont(text)) if text else []

    @property
    def prefix_len(self) -> int:
        """Tokens ``context`` puts before the text (bos), never truncated."""
        return 1 if getattr(self.tokenizer, "bos_id", -1) >= 0 else 0


def _without_dummy_prefix(sp):
    """A copy of a SentencePieceProcessor that adds no dummy-prefix space."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    if not proto.normalizer_spec.add_dummy_prefix:
        return sp
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def join_parts(parts: Sequence[str]) -> list[str]:
    """``parts`` with a newline appended to each one that a later non-empty part follows and
    that does not already end in whitespace: how the parts' texts are joined."""
    out = list(parts)
    for i in range(len(out) - 1):
        if out[i] and not out[i][-1].isspace() and any(out[i + 1:]):
            out[i] += "\n"
    return out


@dataclass
class EncodedRow:
    """``ids`` of one row and each token's ``labels`` (0 context, k > 0 the k-th scored part)."""
    ids: np.ndarray
    labels: np.ndarray
    truncated: int = 0     # context tokens dropped to fit seq_len

    @property
    def slots(self) -> int:
        return len(self.ids) - 1


def encode_row(encoder: TextEncoder, context: str, parts: Sequence[str], *, seq_len: int,
               index: int, what: str = "row", min_cut: int = 0) -> EncodedRow:
    """Tokenize ``context`` and the scored ``parts`` (joined by :func:`join_parts`); cut the
    context from the left (after bos) to fit ``seq_len`` positions, and by at least
    ``min_cut`` tokens."""
    texts = join_parts([context, *parts])
    chunks = [encoder.context(texts[0])] + [encoder.continuation(t) for t in texts[1:]]
    ids = np.asarray([i for c in chunks for i in c], np.int32)
    labels = np.concatenate([np.full(len(c), k, np.int8) for k, c in enumerate(chunks)])
    n_context, scored = len(chunks[0]), len(ids) - len(chunks[0])
    if n_context == 0:
        raise IndicatorError(f"{what} {index}: no context tokens (empty question and a "
                             "tokenizer without bos): its first token has nothing to follow")
    cut = max(len(ids) - 1 - seq_len, min_cut)
    if cut <= 0:
        return EncodedRow(ids, labels)
    keep = encoder.prefix_len
    if n_context - keep - cut < 1:
        raise IndicatorError(
            f"{what} {index} is {len(ids)} tokens long ({scored} of them scored): too long for "
            f"--seq-len {seq_len} even with its context cut to one token (a row of n tokens "
            f"takes n - 1 positions); give a larger --seq-len (at least {scored + keep}) or "
            "shorten the row")
    sel = np.r_[0:keep, keep + cut:len(ids)]
    return EncodedRow(ids[sel], labels[sel], truncated=cut)


# -- packing and scoring ---------------------------------------------------------------------

def pack(rows: Sequence[EncodedRow], seq_len: int, batch_size: int) -> dict[str, np.ndarray]:
    """Rows packed first fit into ``[N, seq_len]`` arrays, N a multiple of ``batch_size``:
    ``inputs``, ``targets``, ``positions``, ``segment_ids`` (0 = padding), ``labels`` (the
    target's part; 0 = not scored) and ``row_ids`` (-1 = padding)."""
    free: list[int] = []                 # positions left in each sequence
    place: list[tuple[int, int]] = []    # (sequence, offset) of each row
    for r in rows:
        if r.slots > seq_len:
            raise ValueError(f"a row of {r.slots} positions does not fit {seq_len}")
        s = next((j for j, f in enumerate(free) if f >= r.slots), None)
        if s is None:
            s = len(free)
            free.append(seq_len)
        place.append((s, seq_len - free[s]))
        free[s] -= r.slots
    n = max(1, -(-len(free) // batch_size)) * batch_size
    out = {k: np.zeros((n, seq_len), np.int32)
           for k in ("inputs", "targets", "positions", "segment_ids", "labels")}
    out["row_ids"] = np.full((n, seq_len), -1, np.int32)
    segment = [0] * len(free)
    for i, (r, (s, o)) in enumerate(zip(rows, place)):
        m = slice(o, o + r.slots)
        segment[s] += 1
        out["inputs"][s, m] = r.ids[:-1]
        out["targets"][s, m] = r.ids[1:]
        out["labels"][s, m] = r.labels[1:]
        out["positions"][s, m] = np.arange(r.slots)
        out["segment_ids"][s, m] = segment[s]
        out["row_ids"][s, m] = i
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_nll(graphdef, state, inputs, targets, positions, segment_ids):
    """``-log p(target)`` at every position, float32 ``[B, T]``."""
    model = nnx.merge(graphdef, state)
    hidden = model(inputs, positions=positions, segment_ids=segment_ids, return_hidden=True)
    b, t, h = hidden.shape
    chunk = min(t, LOGIT_CHUNK)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets, ((0, 0), (0, pad)))

    def piece(xs):
        h_bch, t_bc = xs
        logits = model.logits(h_bch)
        target = jnp.take_along_axis(logits, t_bc[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target

    nll = jax.lax.map(piece, (hidden.reshape(b, n, chunk, h).swapaxes(0, 1),
                              tgt.reshape(b, n, chunk).swapaxes(0, 1)))
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def score_rows(model, rows: Sequence[EncodedRow], *, batch_size: int, seq_len: int,
               n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(nll sums, token counts)``, float64 / int64 ``[len(rows), n_parts + 1]``: per row, the
    summed NLL and the number of targets of each part (column 0, the context, stays 0)."""
    vocab = model.config.vocab_size
    top = max(int(r.ids.max()) for r in rows)
    if top >= vocab:
        raise IndicatorError(f"the tokenizer gives id {top} but the model's vocabulary has "
                             f"{vocab} entries: this tokenizer is not the model's")
    packed = pack(rows, seq_len, batch_size)
    graphdef, state = nnx.split(model)
    sums = np.zeros((len(rows), n_parts + 1), np.float64)
    counts = np.zeros((len(rows), n_parts + 1), np.int64)
    for start in range(0, len(packed["inputs"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in packed.items()}
        nll = np.asarray(_token_nll(graphdef, state, *(jnp.asarray(batch[k]) for k in
                                    ("inputs", "targets", "positions", "segment_ids"))),
                         np.float64)
        scored = (batch["labels"] > 0) & (batch["row_ids"] >= 0)
        r, p = batch["row_ids"][scored], batch["labels"][scored]
        np.add.at(sums, (r, p), nll[scored])
        np.add.at(counts, (r, p), 1)
    return sums, counts


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if batch_size < 1:
        raise IndicatorError(f"--batch-size must be at least 1, got {batch_size}")
    if seq_len < 2:
        raise IndicatorError(f"--seq-len must be at least 2, got {seq_len}")


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


# -- the indicator ---------------------------------------------------------------------------

def indicator_loss(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 8,
                   seq_len: int = 512) -> dict:
    """Mean NLL (nats/token) of the reasoning + answer tokens given the question.

    Returns ``loss`` (token-weighted over all rows), ``tokens``, ``rows``, ``loss_reasoning`` /
    ``tokens_reasoning``, ``loss_answer`` / ``tokens_answer`` (None for a part with no tokens),
    ``row_losses`` (each row's mean), ``truncated_rows`` (rows whose question was cut) and the
    ``batch_size`` / ``seq_len`` used.
    """
    _check_sizes(batch_size, seq_len)
    check_rows(rows, check_indicator_row, "indicator")
    enc = TextEncoder(tokenizer)
    encoded = [encode_row(enc, r["question"], [r["reasoning"], r["answer"]], seq_len=seq_len,
                          index=i) for i, r in enumerate(rows)]
    sums, counts = score_rows(model, encoded, batch_size=batch_size, seq_len=seq_len,
                              n_parts=len(PARTS))
    tokens = int(counts.sum())
    out = {"loss": float(sums.sum() / tokens), "tokens": tokens, "rows": len(rows)}
    for k, part in enumerate(PARTS, 1):
        out[f"loss_{part}"] = _mean(float(sums[:, k].sum()), int(counts[:, k].sum()))
        out[f"tokens_{part}"] = int(counts[:, k].sum())
    out["truncated_rows"] = sum(1 for e in encoded if e.truncated)
    out["row_losses"] = (sums.sum(1) / counts.sum(1)).tolist()
    out.update(batch_size=batch_size, seq_len=seq_len)
    return out


def load_model_and_tokenizer(path: str | Path):
    """``(model, tokenizer)`` of an mcpm checkpoint (or HF directory) that holds its
    tokenizer.model."""
    from mcpm.api import from_pretrained
    from mcpm.tokenizer import TOKENIZER_FILE, Tokenizer

    if Path(path).is_dir() and not (Path(path) / TOKENIZER_FILE).is_file():
        raise IndicatorError(f"{path} has no {TOKENIZER_FILE}: scoring text needs the "
                             "checkpoint's tokenizer (save the checkpoint with its tokenizer "
                             "files, e.g. `mcpm convert ... --tokenizer DIR`)")
    model = from_pretrained(path)
    cfg = model.config
    return model, Tokenizer(path, cfg.bos_token_id, cfg.eos_token_id)


def indicator_loss_of_checkpoint(path: str | Path, data_path: str | Path = "",
                                 batch_size: int = 8, seq_len: int = 512) -> dict:
    """:func:`indicator_loss` of a checkpoint directory on a JSONL file (``""``: the shipped
    set)."""
    rows = load_indicator_rows(data_path)
    model, tokenizer = load_model_and_tokenizer(path)
    out = indicator_loss(model, tokenizer, rows, batch_size=batch_size, seq_len=seq_len)
    out.update(checkpoint=str(path), data=str(data_path or INDICATOR_DATA))
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def indicator_command(args) -> int:
    """``mcpm tunnel indicator CKPT [DATA.jsonl] [--batch-size B] [--seq-len T] [--out F]``."""
    out = indicator_loss_of_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size,
                                       seq_len=args.seq_len)
    print(f"indicator loss {_fmt(out['loss'])} nats/token over {out['tokens']} tokens of "
          f"{out['rows']} rows (reasoning {_fmt(out['loss_reasoning'])} over "
          f"{out['tokens_reasoning']}, answer {_fmt(out['loss_answer'])} over "
          f"{out['tokens_answer']}; {out['truncated_rows']} questions cut to fit)")
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0
