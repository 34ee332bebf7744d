"""Generation: cached decode == full forward at every step, batching, sampling, eos, the decode
loop on the device (host reads per chunk, early stop), no recompiles."""
import contextlib
import math
import re
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mcpm
from mcpm import generation as gen_mod
from mcpm.config import ModelConfig, RopeScaling, SparseConfig
from mcpm.generation import sample_logits, stream_generate


def tiny_model(seed=0, **kw) -> mcpm.MiniCPM4:
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                dim_model_base=12, eos_token_id=(2,), initializer_range=0.3,
                rope_scaling=RopeScaling(long_factor=(1.0, 1.5, 2.0, 3.0),
                                         short_factor=(1.0, 1.2, 1.4, 1.6),
                                         original_max_position_embeddings=128))
    base.update(kw)
    return mcpm.MiniCPM4(ModelConfig(**base), rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, ids):
    return model(ids)


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cached_decode_equals_full_forward_every_step():
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 101, n)) for n in (5, 13, 1)]
    steps = list(stream_generate(model, prompts, 12, eos_token_id=-1, return_logits=True))
    assert len(steps) == 12
    tokens = np.stack([t for t, _ in steps], axis=1)      # [B, 12]
    logits = np.stack([lg for _, lg in steps], axis=1)    # [B, 12, V]
    for row, p in enumerate(prompts):
        seq = np.asarray([list(p) + list(tokens[row])], np.int32)
        # causal: row i of one full forward is the forward over the prefix ending at i
        full = np.asarray(forward(model, jnp.asarray(seq)))[0, len(p) - 1: len(p) + 11]
        for step in range(12):
            assert rel(logits[row, step], full[step]) < 1e-5, (row, step)
        np.testing.assert_array_equal(tokens[row], np.argmax(full, axis=-1))


def test_batch_of_different_lengths_equals_one_by_one():
    model = tiny_model(seed=1)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 101, n)) for n in (9, 2, 17)]
    batch = mcpm.generate(model, prompts, max_new_tokens=10, eos_token_id=-1)
    for p, out in zip(prompts, batch):
        alone = mcpm.generate(model, np.asarray([p]), max_new_tokens=10, eos_token_id=-1)[0]
        np.testing.assert_array_equal(out, alone)
        assert len(out) == len(p) + 10 and list(out[: len(p)]) == p


def test_several_eos_ids_stop_rows_and_pad():
    model = tiny_model(seed=2)
    prompt = np.array([[5, 17, 33, 8], [9, 9, 4, 70]], np.int32)
    free = mcpm.generate(model, prompt, max_new_tokens=8, eos_token_id=-1)
    stop_a = int(free[0, 4 + 2])   # row 0 should stop at its 3rd new token
    eos = (stop_a, 100) if stop_a != 100 else (stop_a, 99)
    out = mcpm.generate(model, prompt, max_new_tokens=8, eos_token_id=list(eos))
    assert out.shape == (2, 12)
    first = next(i for i in range(4, 12) if free[0, i] in eos)
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == eos[0]).all()
    # ragged form returns prompt + tokens up to and including the first eos
    rag = mcpm.generate(model, [list(prompt[0]), [3]], max_new_tokens=8, eos_token_id=list(eos))
    np.testing.assert_array_equal(rag[0], free[0, : first + 1])


def test_generate_compiles_once_per_shape():
    model = tiny_model(seed=3)
    prompt = np.array([[4, 5, 6]], np.int32)
    mcpm.generate(model, prompt, max_new_tokens=3, eos_token_id=-1)
    compiled = lambda: (gen_mod._prefill._cache_size(), gen_mod._decode_chunk._cache_size())
    before = compiled()
    mcpm.generate(model, prompt, max_new_tokens=20, eos_token_id=-1)  # same cache size (64)
    mcpm.generate(model, prompt + 7, max_new_tokens=56, eos_token_id=-1)
    for chunk in (1, 6, None):       # streaming runs the same program, whatever the chunking
        list(stream_generate(model, prompt, 9, eos_token_id=-1, chunk_size=chunk))
    assert compiled() == before


def test_top_k_one_is_greedy():
    model = tiny_model(seed=4)
    prompt = np.array([[7, 8, 9, 10]], np.int32)
    greedy = mcpm.generate(model, prompt, max_new_tokens=6, eos_token_id=-1)
    sampled = mcpm.generate(model, prompt, max_new_tokens=6, temperature=1.5, top_k=1,
                            eos_token_id=-1, seed=3)
    np.testing.assert_array_equal(greedy, sampled)


def _nucleus(logits, top_p, among):
    """Smallest set of most likely tokens, among ``among``, whose mass reaches top_p."""
    p = np.zeros_like(logits, dtype=np.float64)
    idx = sorted(among)
    p[idx] = np.exp(logits[idx] - logits[idx].max())
    p /= p.sum()
    order = [i for i in np.argsort(-p) if i in among]
    keep, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        keep.append(i)
        mass += p[i]
    return set(keep)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.6), (5, 0.8)])
def test_sampling_distribution(top_k, top_p):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(12).astype(np.float32) * 1.5
    temperature = 0.7
    allowed = set(range(12))
    if top_k:
        allowed &= set(np.argsort(-logits)[:top_k])
    if top_p < 1:
        allowed &= _nucleus(logits / temperature, top_p, allowed)  # top-k first, then top-p
    expect = np.zeros(12)
    z = np.exp((logits - logits.max()) / temperature)
    idx = sorted(allowed)
    expect[idx] = z[idx] / z[idx].sum()
    n = 20000
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, 12))
    draws = np.asarray(sample_logits(batch, jax.random.key(0), temperature, top_k, top_p))
    freq = np.bincount(draws, minlength=12) / n
    assert set(np.flatnonzero(freq)) <= allowed
    np.testing.assert_allclose(freq, expect, atol=0.015)


def test_max_position_warning_and_empty_prompt():
    model = tiny_model(max_position_embeddings=16, rope_scaling=None)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        mcpm.generate(model, np.array([[1, 2, 3]]), max_new_tokens=15, eos_token_id=-1)
    with pytest.raises(ValueError, match="at least one token"):
        mcpm.generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="chunk_size"):
        next(stream_generate(model, [[1, 2]], 4, chunk_size=0))


@pytest.mark.parametrize("program,sparse", [("step", False), ("chunk", False), ("chunk", True)])
def test_decode_updates_cache_in_place(program, sparse):
    """The donated cache is the output buffer and no layer's keys/values (or InfLLM v2
    compressed keys) are copied or transposed per step, in the decode loop as in one step (the
    cost that grew with batch x cache slots)."""
    sparse_config = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8,
                                 window_size=16, topk=2, use_nope=False, dense_len=48,
                                 lse_approx=True) if sparse else None
    model = tiny_model(seed=4, sparse_config=sparse_config)
    cfg = model.config
    b, s = 3, 64
    cache = mcpm.KVCache.create(cfg, b, s)
    assert cache.k.shape == (2, b, 2, s, 8) and cache.max_len == s
    leaves = [x for x in jax.tree.leaves(cache) if x.ndim >= 3]
    assert len(leaves) == (5 if sparse else 2)
    graphdef, state = nnx.split(model)
    tokens, pos = jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "Some donated buffers were not usable" fails here
        if program == "step":
            lowered = gen_mod._decode_step.lower(graphdef, state, tokens, pos, cache,
                                                 jax.random.key(0), (0.0, 0, 1.0))
        else:
            carry = gen_mod.DecodeState(tokens, jnp.zeros((b,), bool), pos, jax.random.key(0))
            lowered = gen_mod._decode_chunk.lower(graphdef, state, cache, carry, np.int32(5),
                                                  jnp.asarray([2], jnp.int32), (0.0, 0, 1.0),
                                                  logit_steps=0)
        hlo = lowered.compile().as_text()
    aliases = re.findall(r"\{\d+\}: \(\d+, \{\}, may-alias\)", hlo.splitlines()[0])
    assert len(aliases) >= len(leaves)
    cache_dims = {tuple(sorted(x.shape[i:])) for x in leaves for i in (0, 1)}
    moved = [line for line in hlo.splitlines()
             if (m := re.search(r"= \w+\[([\d,]+)\]\{[\d,]*\} (copy|transpose)\(", line))
             and tuple(sorted(map(int, m.group(1).split(",")))) in cache_dims]
    assert not moved, moved


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Counts the decode-loop calls and the explicit device-to-host reads (``jax.device_get``)
    of generation; ``chunks`` collects each call's step count (a device scalar). On an
    accelerator the transfer guard also makes any implicit read (``np.asarray`` of a device
    array) raise; on the CPU arrays live in host memory and the guard lets them through."""
    seen = {"chunks": [], "reads": 0}
    decode_chunk, device_get = gen_mod._decode_chunk, jax.device_get

    def counted_chunk(*args, **kwargs):
        out = decode_chunk(*args, **kwargs)
        seen["chunks"].append(out[2])
        return out

    def counted_get(x):
        seen["reads"] += 1
        return device_get(x)

    monkeypatch.setattr(gen_mod, "_decode_chunk", counted_chunk)
    monkeypatch.setattr(jax, "device_get", counted_get)
    with jax.transfer_guard_device_to_host("disallow"):
        yield seen


def test_decode_loop_runs_on_the_device(monkeypatch):
    """generate: one loop call and one read whatever the length; stream_generate: one read for
    the prefill's token, then one loop call and one read per chunk; same tokens either way."""
    model = tiny_model(seed=6)
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(3, 101, n)) for n in (6, 11)]
    new = 23
    with host_reads(monkeypatch) as seen:
        out = mcpm.generate(model, prompts, max_new_tokens=new, eos_token_id=-1)
    assert len(seen["chunks"]) == 1 and seen["reads"] == 1
    assert int(seen["chunks"][0]) == new - 1         # the prefill gave the first token
    expect = np.stack([row[len(p):] for p, row in zip(prompts, out)], axis=1)   # [new, B]
    for chunk in (1, 5, 22, 40):
        with host_reads(monkeypatch) as seen:
            steps = np.stack(list(stream_generate(model, prompts, new, eos_token_id=-1,
                                                  chunk_size=chunk)))
        calls = math.ceil((new - 1) / chunk)
        assert len(seen["chunks"]) == calls and seen["reads"] == 1 + calls, (chunk, seen)
        np.testing.assert_array_equal(steps, expect)
    with host_reads(monkeypatch) as seen:           # chunks sized by time: still the same tokens
        steps = np.stack(list(stream_generate(model, prompts, new, eos_token_id=-1)))
    assert seen["reads"] == 1 + len(seen["chunks"]) <= new
    np.testing.assert_array_equal(steps, expect)


def test_loop_stops_when_every_row_has_finished(monkeypatch):
    """Once every row has produced an eos id no further step runs (in generate's single call
    and in a stream's chunk), and finished rows keep the fill token."""
    model = tiny_model(seed=7, initializer_range=0.1)   # flatter logits: varied samples
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, 101, (3, 5)).astype(np.int32)
    new = 40
    kwargs = dict(temperature=1.0, seed=int(rng.integers(1000)))
    free = mcpm.generate(model, prompt, max_new_tokens=new, eos_token_id=-1, **kwargs)[:, 5:]
    # each row stops at the first of its tokens in the eos set (at its step 2, 9, 4 or before)
    eos = sorted({int(free[r, s]) for r, s in enumerate((2, 9, 4))})
    stops = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in free]
    assert 1 <= max(stops) < 10
    with host_reads(monkeypatch) as seen:
        out = mcpm.generate(model, prompt, max_new_tokens=new, eos_token_id=eos, **kwargs)
    out = out[:, 5:]
    assert [int(n) for n in seen["chunks"]] == [max(stops)]   # decode steps after the prefill
    for row, stop in enumerate(stops):
        np.testing.assert_array_equal(out[row, : stop + 1], free[row, : stop + 1])
        assert (out[row, stop + 1:] == eos[0]).all()
    with host_reads(monkeypatch) as seen:
        steps = list(stream_generate(model, prompt, new, eos_token_id=eos, chunk_size=32,
                                     **kwargs))
    assert [int(n) for n in seen["chunks"]] == [max(stops)] and seen["reads"] == 2
    np.testing.assert_array_equal(np.stack(steps, axis=1), out[:, : max(stops) + 1])


FULL_LEN = 32


def reference_decode(model, prompts, new, eos, seed, sampling):
    """Sampling step by step through the cache-less forward, with the documented key stream:
    ``key = jax.random.key(seed)``, then ``key, sub = jax.random.split(key)`` before each token,
    ``sub`` drawing that token for the whole batch. A row yields ``eos[0]`` after its first eos
    id. Returns the new tokens ``[B, new]``."""
    key = jax.random.key(seed)
    seqs = [list(p) for p in prompts]
    done = np.zeros(len(prompts), bool)
    out = []
    for _ in range(new):
        ids = np.zeros((len(seqs), FULL_LEN), np.int32)   # trailing filler: causal, unseen
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
        full = np.asarray(forward(model, jnp.asarray(ids)))
        last = np.stack([full[r, len(s) - 1] for r, s in enumerate(seqs)])
        key, sub = jax.random.split(key)
        drawn = np.asarray(sample_logits(jnp.asarray(last), sub, *sampling))
        step = np.where(done, eos[0], drawn)
        done |= np.isin(drawn, eos)
        for s, t in zip(seqs, step):
            s.append(int(t))
        out.append(step)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 12, 0.9)])
def test_sampling_follows_the_reference_key_stream(temperature, top_k, top_p):
    """Seeded sampling on a ragged batch with eos ids equals the step-by-step reference: the
    same tokens from the same keys, so the device loop keeps the host loop's random stream."""
    model = tiny_model(seed=8, initializer_range=0.1)   # flatter logits: varied samples
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(3, 101, n)) for n in (4, 12, 7)]
    new, seed, sampling = 16, int(rng.integers(1000)), (temperature, top_k, top_p)
    free = reference_decode(model, prompts, new, (-1,), seed, sampling)
    eos = (int(free[1, 5]), int(free[2, 12]))       # rows 1 and 2 stop early
    expect = reference_decode(model, prompts, new, eos, seed, sampling)
    assert (expect[1, 6:] == eos[0]).all() and len(set(free[0])) > 3   # really sampled
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos,
                  seed=seed)
    out = mcpm.generate(model, prompts, max_new_tokens=new, **kwargs)
    for p, row, want in zip(prompts, out, expect):
        stop = np.flatnonzero(np.isin(want, eos))
        np.testing.assert_array_equal(row, p + list(want[: stop[0] + 1 if stop.size else new]))
    steps = list(stream_generate(model, prompts, new, chunk_size=3, **kwargs))
    np.testing.assert_array_equal(np.stack(steps, axis=1), expect[:, : len(steps)])
