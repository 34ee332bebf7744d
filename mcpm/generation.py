"""Text generation: one jitted prefill, then the decode loop on the device over a preallocated
KV cache.

Shapes are fixed for a whole call (prompts are left-padded to a multiple of 8 and the cache is
sized for prompt + new tokens, rounded up to 64 slots). The decode loop is a ``lax.while_loop``
inside one jitted function (:func:`_decode_chunk`): each iteration feeds the previous token,
samples the next one, fills rows that have finished with the first eos id, and the loop stops
after ``limit`` steps or as soon as every row has finished. The host only sets ``limit`` and
reads the tokens back: ``generate`` runs all steps in one call and reads back once,
``stream_generate`` reads back once per chunk of steps. The number of steps is an argument, not
a shape, so neither ``max_new_tokens`` nor the chunk length compiles anything new; the layers are
a ``lax.scan`` inside each step. Prompts of different lengths share one batch: padding slots
carry segment id 0 and are never attended, and each row's RoPE positions start at 0 at its first
real token.

A model with a ``sparse_config`` generates with InfLLM v2 (spec 3 "Decode"): its cache also keeps
the compressed keys, extended by the prefill and every step, and each row switches from dense to
sparse attention when its own length reaches ``dense_len``; blocks and kernels count from each
row's first real token, so left padding does not change a row's tokens.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.model.minicpm4 import KVCache, MiniCPM4

PAD_MULTIPLE = 8
CACHE_MULTIPLE = 64
# stream_generate's default chunking: each host sync covers about STREAM_SECONDS of decoding, at
# most STREAM_CHUNK steps (a fast model streams in bursts of 64 tokens, a slow one token by token)
STREAM_SECONDS = 0.1
STREAM_CHUNK = 64


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


class DecodeState(NamedTuple):
    """What the decode loop carries from step to step and from one chunk to the next."""
    token: jax.Array      # [B] int32, the last token sampled (as sampled: not yet filled)
    finished: jax.Array   # [B] bool, the row has sampled an eos id (token included)
    pos: jax.Array        # [B] int32, the RoPE position the next fed token takes
    key: jax.Array        # PRNG key; every step splits its own subkey off it


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _prefill(graphdef, state, ids_bt, seg_bt, pos_bt, cache, key, eos, sampling):
    """The prompt into the cache and the first new token: (its logits [B, V], DecodeState,
    cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids_bt, positions=pos_bt, segment_ids=seg_bt, cache=cache)
    last = logits[:, -1]
    key, sub = jax.random.split(key)
    token = sample_logits(last, sub, *sampling)
    # a row's last prompt token sits at position length - 1 (left padding is at position 0)
    carry = DecodeState(token, jnp.isin(token, eos), pos_bt[:, -1] + 1, key)
    return last, carry, cache


def _step(model, token_b, pos_b, cache, key, sampling):
    """One decode step: feed ``token_b`` at ``pos_b``; (logits [B, V], next token, cache)."""
    seg = jnp.ones_like(token_b)[:, None]
    logits, cache = model(token_b[:, None], positions=pos_b[:, None], segment_ids=seg, cache=cache)
    last = logits[:, 0]
    return last, sample_logits(last, key, *sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode_step(graphdef, state, token_b, pos_b, cache, key, sampling):
    """One decode step on its own: the work of one iteration of :func:`_decode_chunk`."""
    return _step(nnx.merge(graphdef, state), token_b, pos_b, cache, key, sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "logit_steps"),
                   donate_argnames=("cache",))
def _decode_chunk(graphdef, state, cache, carry, limit, eos, sampling, logit_steps):
    """Up to ``limit`` decode steps in one device loop, ending early once every row has finished.

    Returns ``(tokens [S, B], logits, n, carry, cache)``: the first ``n`` rows of ``tokens`` are
    the steps run (finished rows filled with ``eos[0]``; S = cache slots, more steps than a call
    can take); ``logits [logit_steps, B, V]`` float32 when ``logit_steps`` (then ``limit <=
    logit_steps``), else None. ``limit`` is traced: any count up to S runs the same program.
    """
    model = nnx.merge(graphdef, state)
    b = carry.token.shape[0]
    tokens = jnp.zeros((cache.max_len, b), jnp.int32)
    logits = (jnp.zeros((logit_steps, b, model.config.vocab_size), jnp.float32)
              if logit_steps else None)

    def running(loop):
        n, _, _, _, c = loop
        return (n < limit) & ~jnp.all(c.finished)

    def step(loop):
        n, tokens, logits, cache, c = loop
        key, sub = jax.random.split(c.key)
        feed = jnp.where(c.finished, eos[0], c.token)
        last, token, cache = _step(model, feed, c.pos, cache, sub, sampling)
        out = jnp.where(c.finished, eos[0], token)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, out, n, 0)
        if logits is not None:
            logits = jax.lax.dynamic_update_index_in_dim(logits, last, n, 0)
        c = DecodeState(token, c.finished | jnp.isin(token, eos), c.pos + 1, key)
        return n + 1, tokens, logits, cache, c

    n, tokens, logits, cache, carry = jax.lax.while_loop(
        running, step, (jnp.zeros((), jnp.int32), tokens, logits, cache, carry))
    return tokens, logits, n, carry, cache


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


class _Run(NamedTuple):
    """A dispatched prefill: what the decode calls need next (all device values but sizes)."""
    graphdef: nnx.GraphDef
    state: nnx.State
    sampling: tuple
    eos: jax.Array
    last: jax.Array         # [B, V] logits of the first new token
    carry: DecodeState
    cache: KVCache


def _start(model: MiniCPM4, prompts: list[list[int]], max_new_tokens: int, temperature: float,
           top_k: int, top_p: float, eos: tuple[int, ...], seed: int) -> _Run:
    """Left-pad, make the cache and dispatch the prefill (nothing is read back)."""
    cfg = model.config
    ids, seg, lengths = left_pad(prompts)
    b, p = ids.shape
    if lengths.max() + max_new_tokens > cfg.max_position_embeddings:
        warnings.warn(f"generating up to {lengths.max() + max_new_tokens} positions, beyond "
                      f"max_position_embeddings ({cfg.max_position_embeddings})", stacklevel=3)
    cache_len = int(-(-(p + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE)
    cache = KVCache.create(cfg, b, cache_len)
    pos = np.maximum(np.arange(p, dtype=np.int32)[None, :] - (p - lengths)[:, None], 0)
    graphdef, state = nnx.split(model)
    sampling = (float(temperature), int(top_k), float(top_p))
    eos_arr = jnp.asarray(eos, jnp.int32)
    last, carry, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(seg),
                                  jnp.asarray(pos), cache, jax.random.key(seed), eos_arr,
                                  sampling)
    return _Run(graphdef, state, sampling, eos_arr, last, carry, cache)


def stream_generate(model: MiniCPM4, prompts, max_new_tokens: int = 32, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
                    return_logits: bool = False, chunk_size: int | None = None) -> Iterator:
    """Yield the next token of every row (``[B]`` int32 numpy) at each step.

    Rows that have produced an eos token yield ``eos_token_id[0]`` from then on; the loop ends
    when every row has finished or after ``max_new_tokens``. With ``return_logits`` each item is
    ``(tokens [B], float32 logits [B, V])``, the logits the token was chosen from.

    The first token is yielded as soon as the prefill has run; the others are decoded on the
    device ``chunk_size`` steps at a time and yielded a chunk at a time. ``None`` (the default)
    sizes each chunk to about 0.1 s of decoding from the speed measured so far (1 to 64 steps):
    a fast model syncs rarely, a slow one still streams token by token. The tokens do not depend
    on the chunking.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    prompts = [list(map(int, p)) for p in prompts]
    eos = _eos_ids(model.config, eos_token_id)
    if max_new_tokens <= 0:
        return
    run = _start(model, prompts, max_new_tokens, temperature, top_k, top_p, eos, seed)
    token, finished, last = jax.device_get((run.carry.token, run.carry.finished, run.last)
                                           if return_logits else
                                           (run.carry.token, run.carry.finished, None))
    yield (token, last) if return_logits else token
    carry, cache = run.carry, run.cache
    logit_steps = (chunk_size or STREAM_CHUNK) if return_logits else 0
    limit = chunk_size or 1
    done = 1
    while done < max_new_tokens and not finished.all():
        t0 = time.perf_counter()
        tokens, logits, n, carry, cache = _decode_chunk(
            run.graphdef, run.state, cache, carry, np.int32(min(limit, max_new_tokens - done)),
            run.eos, run.sampling, logit_steps=logit_steps)
        tokens, logits, n, finished = jax.device_get((tokens, logits, n, carry.finished))
        n = int(n)
        if chunk_size is None:
            per_step = (time.perf_counter() - t0) / max(n, 1)
            limit = int(np.clip(STREAM_SECONDS / per_step, 1, STREAM_CHUNK))
        for i in range(n):
            yield (tokens[i], logits[i]) if return_logits else tokens[i]
        done += n


def generate(model: MiniCPM4, input_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             seed: int = 0):
    """Generate continuations.

    ``input_ids``: an int array ``[B, T]`` (returns ``[B, T + max_new_tokens]``, rows that stop
    early are filled with the first eos id) or a list of prompts of different lengths (returns a
    list of 1-D arrays, prompt + new tokens up to and including the first eos).

    The whole decode loop runs on the device in one call (ending early once every row has
    finished), and the tokens are read back once.
    """
    ragged = isinstance(input_ids, (list, tuple)) and not _is_rectangular(input_ids)
    prompts = [list(map(int, p)) for p in (input_ids if ragged else np.asarray(input_ids))]
    eos = _eos_ids(model.config, eos_token_id)
    new = np.full((len(prompts), max(max_new_tokens, 0)), eos[0], np.int32)
    if max_new_tokens > 0:
        run = _start(model, prompts, max_new_tokens, temperature, top_k, top_p, eos, seed)
        tokens, n = np.zeros((0, len(prompts)), np.int32), 0
        if max_new_tokens > 1:
            tokens, _, n, _, _ = _decode_chunk(run.graphdef, run.state, run.cache, run.carry,
                                               np.int32(max_new_tokens - 1), run.eos,
                                               run.sampling, logit_steps=0)
        first, tokens, n = jax.device_get((run.carry.token, tokens, n))
        new[:, 0] = first
        new[:, 1: 1 + n] = tokens[:n].T
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
