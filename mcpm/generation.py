"""Text generation: one jitted prefill, then jitted decode steps over a preallocated KV cache.

Shapes are fixed for a whole call (prompts are left-padded to a multiple of 8 and the cache is
sized for prompt + new tokens, rounded up to 64 slots), so the decode step compiles once and is
reused for every token; the layers are a ``lax.scan`` inside it. Prompts of different lengths
share one batch: padding slots carry segment id 0 and are never attended, and each row's RoPE
positions start at 0 at its first real token.

A model with a ``sparse_config`` generates with InfLLM v2 (spec 3 "Decode"): its cache also keeps
the compressed keys, extended by the prefill and every step, and each row switches from dense to
sparse attention when its own length reaches ``dense_len``; blocks and kernels count from each
row's first real token, so left padding does not change a row's tokens.
"""
from __future__ import annotations

import functools
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.model.minicpm4 import KVCache, MiniCPM4

PAD_MULTIPLE = 8
CACHE_MULTIPLE = 64


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
    """Greedy when temperature == 0; else softmax(logits / temperature) restricted to the top_k
    tokens (0 = all) and the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, neg)
        logits = jnp.full_like(logits, neg).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _prefill(graphdef, state, ids_bt, seg_bt, pos_bt, cache, key, sampling):
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids_bt, positions=pos_bt, segment_ids=seg_bt, cache=cache)
    last = logits[:, -1]
    return last, sample_logits(last, key, *sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode_step(graphdef, state, token_b, pos_b, cache, key, sampling):
    model = nnx.merge(graphdef, state)
    seg = jnp.ones_like(token_b)[:, None]
    logits, cache = model(token_b[:, None], positions=pos_b[:, None], segment_ids=seg, cache=cache)
    last = logits[:, 0]
    return last, sample_logits(last, key, *sampling), cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = PAD_MULTIPLE
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, P], segment ids [B, P] with 0 on padding, lengths [B]), P a multiple of 8."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() == 0:
        raise ValueError("every prompt needs at least one token (add the bos token)")
    width = int(-(-lengths.max() // multiple) * multiple)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = np.asarray(p, np.int32)
        seg[row, width - len(p):] = 1
    return ids, seg, lengths


def stream_generate(model: MiniCPM4, prompts, max_new_tokens: int = 32, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
                    return_logits: bool = False) -> Iterator:
    """Yield the next token of every row (``[B]`` int32 numpy) at each step.

    Rows that have produced an eos token yield ``eos_token_id[0]`` from then on; the loop ends
    when every row has finished or after ``max_new_tokens``. With ``return_logits`` each item is
    ``(tokens [B], float32 logits [B, V])``, the logits the token was chosen from.
    """
    cfg = model.config
    prompts = [list(map(int, p)) for p in prompts]
    eos = _eos_ids(cfg, eos_token_id)
    if max_new_tokens <= 0:
        return
    ids, seg, lengths = left_pad(prompts)
    b, p = ids.shape
    if lengths.max() + max_new_tokens > cfg.max_position_embeddings:
        warnings.warn(f"generating up to {lengths.max() + max_new_tokens} positions, beyond "
                      f"max_position_embeddings ({cfg.max_position_embeddings})", stacklevel=2)
    cache_len = int(-(-(p + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE)
    cache = KVCache.create(cfg, b, cache_len)
    pos = np.maximum(np.arange(p, dtype=np.int32)[None, :] - (p - lengths)[:, None], 0)
    graphdef, state = nnx.split(model)
    sampling = (float(temperature), int(top_k), float(top_p))
    key = jax.random.key(seed)
    eos_arr = jnp.asarray(eos, jnp.int32)

    key, sub = jax.random.split(key)
    logits, token, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(seg),
                                    jnp.asarray(pos), cache, sub, sampling)
    finished = np.zeros(b, bool)
    next_pos = jnp.asarray(lengths)
    for step in range(max_new_tokens):
        tok = np.asarray(token)
        out = np.where(finished, eos[0], tok).astype(np.int32)
        finished |= np.isin(tok, np.asarray(eos))
        yield (out, np.asarray(logits)) if return_logits else out
        if finished.all() or step == max_new_tokens - 1:
            return
        key, sub = jax.random.split(key)
        feed = jnp.where(jnp.asarray(finished), eos_arr[0], token)
        logits, token, cache = _decode_step(graphdef, state, feed, next_pos, cache, sub, sampling)
        next_pos = next_pos + 1


def generate(model: MiniCPM4, input_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             seed: int = 0):
    """Generate continuations.

    ``input_ids``: an int array ``[B, T]`` (returns ``[B, T + max_new_tokens]``, rows that stop
    early are filled with the first eos id) or a list of prompts of different lengths (returns a
    list of 1-D arrays, prompt + new tokens up to and including the first eos).
    """
    ragged = isinstance(input_ids, (list, tuple)) and not _is_rectangular(input_ids)
    prompts = [list(map(int, p)) for p in (input_ids if ragged else np.asarray(input_ids))]
    eos = _eos_ids(model.config, eos_token_id)
    steps = list(stream_generate(model, prompts, max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, eos_token_id=eos, seed=seed))
    new = np.stack(steps, axis=1) if steps else np.zeros((len(prompts), 0), np.int32)
    new = np.concatenate([new, np.full((len(prompts), max_new_tokens - new.shape[1]), eos[0],
                                       np.int32)], axis=1)
    if not ragged:
        return np.concatenate([np.asarray(prompts, np.int32), new], axis=1)
    out = []
    for p, row in zip(prompts, new):
        stop = np.flatnonzero(np.isin(row, np.asarray(eos)))
        out.append(np.asarray(p + list(row[: stop[0] + 1 if stop.size else len(row)]), np.int32))
    return out


def _eos_ids(cfg, eos_token_id) -> tuple[int, ...]:
    """The stop ids: the config's unless overridden (an int or a sequence)."""
    if eos_token_id is None:
        return tuple(cfg.eos_token_id)
    return (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)


def _is_rectangular(rows) -> bool:
    try:
        return len({len(r) for r in rows}) <= 1
    except TypeError:
        return True
