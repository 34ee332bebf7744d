"""Generation: cached decode == full forward at every step, batching, sampling, eos, no recompiles."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mcpm
from mcpm import generation as gen_mod
from mcpm.config import ModelConfig, RopeScaling
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


def test_decode_step_compiles_once():
    model = tiny_model(seed=3)
    prompt = np.array([[4, 5, 6]], np.int32)
    mcpm.generate(model, prompt, max_new_tokens=3, eos_token_id=-1)
    before = gen_mod._decode_step._cache_size()
    mcpm.generate(model, prompt, max_new_tokens=20, eos_token_id=-1)  # same cache size (64)
    assert gen_mod._decode_step._cache_size() == before


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


def test_decode_step_updates_cache_in_place():
    """The donated cache is the output buffer and no layer's keys/values are copied or
    transposed per step (the cost that grew with batch x cache slots)."""
    import re
    import warnings

    model = tiny_model(seed=4)
    cfg = model.config
    b, s = 3, 64
    cache = mcpm.KVCache.create(cfg, b, s)
    assert cache.k.shape == (2, b, 2, s, 8) and cache.max_len == s
    graphdef, state = nnx.split(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "Some donated buffers were not usable" fails here
        hlo = gen_mod._decode_step.lower(graphdef, state, jnp.ones((b,), jnp.int32),
                                         jnp.zeros((b,), jnp.int32), cache, jax.random.key(0),
                                         (0.0, 0, 1.0)).compile().as_text()
    assert "input_output_alias" in hlo.splitlines()[0]
    cache_dims = [sorted(cache.k.shape), sorted(cache.k.shape[1:])]
    moved = [line for line in hlo.splitlines()
             if (m := re.search(r"= \w+\[([\d,]+)\]\{[\d,]*\} (copy|transpose)\(", line))
             and sorted(map(int, m.group(1).split(","))) in cache_dims]
    assert not moved, moved
