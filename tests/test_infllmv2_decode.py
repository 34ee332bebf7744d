"""InfLLM v2 decode: the compressed-key cache, sparse attention over the KV cache, the dense
switch per row and padding independence. The logits of every decode step must equal the
cache-less forward of the same sequence at that length (spec 3 "Decode")."""
import contextlib
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mcpm
from mcpm import generation as gen_mod
from mcpm.config import ModelConfig, SparseConfig
from mcpm.generation import stream_generate
from mcpm.model import KVCache, MiniCPM4, minicpm4
from mcpm.model.attention import attention_mask, dense_attention
from mcpm_kernels.infllmv2.decode import (append_keys, compressed_cache_sizes,
                                          select_from_kernel_cache)
from mcpm_kernels.infllmv2.reference import (block_mask, coarse_kernel_sizes, compress_keys,
                                             num_kernels)

SPARSE = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16,
                      topk=2, use_nope=False, dense_len=-1)
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            dim_model_base=8, eos_token_id=(2,), initializer_range=0.5)
TOL = dict(rtol=1e-5, atol=1e-5)
FULL_LEN = 96    # every reference forward runs at this length (one compile per model)


def model_with(sparse, seed=0):
    return MiniCPM4(ModelConfig(**BASE, sparse_config=sparse), rngs=nnx.Rngs(seed))


@contextlib.contextmanager
def attention_switched_per_position(use_sparse_bt):
    """The model's cache-less attention seam, with each query position taking InfLLM v2 where
    ``use_sparse_bt`` and dense attention elsewhere (the call runs at a length >= dense_len, so
    the seam itself is InfLLM v2 for every position)."""
    original = minicpm4.attention

    def switched(q, k, v, cfg, segment_ids=None, k_pre_rope_btkd=None):
        sparse = original(q, k, v, cfg, segment_ids, k_pre_rope_btkd)
        b, t = q.shape[:2]
        slot = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        dense = dense_attention(q, k, v, attention_mask(slot, seg, slot, seg))
        return jnp.where(use_sparse_bt[:, :, None, None], sparse, dense)

    minicpm4.attention = switched
    try:
        yield
    finally:
        minicpm4.attention = original


def reference_logits(sparse, seed, seqs, call_lens=None):
    """Per sequence, ``[len, V]`` logits of the cache-less forward of the sequence alone (no
    padding), each position computed as the call that appended it would: dense if that call's
    key length ``call_lens[r][i]`` (default: the whole sequence) is below dense_len, else
    InfLLM v2. A KV cache holds every position as it was computed, so a generation reaching
    dense_len keeps the dense layer outputs of its earlier positions (their keys and values in
    the next layers), while a prefill at that length is sparse everywhere. Also returns the
    all-dense logits ``[R, FULL_LEN, V]``. Trailing filler up to FULL_LEN does not change earlier
    rows (causal, and kernels that end after a query are invisible to it)."""
    ids = np.zeros((len(seqs), FULL_LEN), np.int32)
    use = np.zeros((len(seqs), FULL_LEN), bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        n = np.full(len(s), len(s)) if call_lens is None else np.asarray(call_lens[r])
        use[r, : len(s)] = (n >= sparse.dense_len) if sparse.dense_len != -1 else True
    model = model_with(sparse, seed)
    both = np.concatenate([use, np.zeros_like(use)])           # one batch: reference, dense
    with attention_switched_per_position(jnp.asarray(both)):
        out = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(np.tile(ids, (2, 1)))))
    return [out[r, : len(s)] for r, s in enumerate(seqs)], out[len(seqs):]


def check_generation(sparse, prompt_lens, new, seed=0):
    """stream_generate (left-padded batch, cached prefill then decode steps): every step's
    logits equal the reference of the sequence alone, and greedy tokens are their argmax."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 64, n)) for n in prompt_lens]
    model = model_with(sparse, seed)
    steps = list(stream_generate(model, prompts, new, eos_token_id=-1, return_logits=True))
    tokens = np.stack([t for t, _ in steps], axis=1)           # [B, new]
    logits = np.stack([lg for _, lg in steps], axis=1)         # [B, new, V]
    seqs = [p + list(tokens[r, :-1]) for r, p in enumerate(prompts)]
    call_lens = [np.maximum(len(p), np.arange(1, len(s) + 1)) for p, s in zip(prompts, seqs)]
    ref, dense = reference_logits(sparse, seed, seqs, call_lens)
    for r, p in enumerate(prompts):
        expect = ref[r][len(p) - 1:]                           # [new, V]
        for step in range(new):
            np.testing.assert_allclose(logits[r, step], expect[step], err_msg=f"row {r} step "
                                       f"{step}", **TOL)
        np.testing.assert_array_equal(tokens[r], np.argmax(expect, axis=-1))
        # the selection really drops blocks here (the test is not dense against dense)
        assert np.abs(ref[r][40:] - dense[r, 40: len(ref[r])]).max() > 1e-3
    return model, prompts, tokens


@pytest.mark.parametrize("name,sparse", [
    ("A", SPARSE),
    ("B_lse_approx", dataclasses.replace(SPARSE, variant="B", topk=4, lse_approx=True)),
    ("A_use_nope", dataclasses.replace(SPARSE, use_nope=True)),
])
def test_always_sparse_decode_equals_prefill(name, sparse):
    # two ragged prompts (left-padded to 24 slots: 3 and 14 padding slots), up to 70 positions
    check_generation(sparse, (21, 10), 50, seed=1)


def test_generation_crossing_dense_len_switches_per_row():
    # dense_len 40: row 0 crosses it at decode step 27, row 1 at step 10 (a batch mixing dense
    # and sparse rows), row 2's prompt is already above it (sparse prefill next to dense rows)
    model, prompts, tokens = check_generation(dataclasses.replace(SPARSE, dense_len=40),
                                              (13, 30, 45), 48, seed=2)
    # mcpm.generate end to end: the same greedy tokens; a second call compiles nothing
    out = mcpm.generate(model, prompts, max_new_tokens=48, eos_token_id=-1)
    for p, row, toks in zip(prompts, out, tokens):
        np.testing.assert_array_equal(row, np.concatenate([p, toks]))
    compiled = lambda: (gen_mod._prefill._cache_size(), gen_mod._decode_chunk._cache_size())
    before = compiled()
    again = mcpm.generate(model, prompts, max_new_tokens=40, eos_token_id=-1)
    assert compiled() == before
    for row, again_row in zip(out, again):
        np.testing.assert_array_equal(again_row, row[:len(again_row)])


def test_chunks_appended_to_a_cache():
    """model(ids, cache=...) with chunks of several tokens: a long dense prefill (its dense
    branch in query chunks), a decode step, then a 20-token chunk crossing dense_len appended to
    the non-empty cache (several query chunks). Each chunk's rows equal the cache-less reference
    at the chunk's total length."""
    sparse = dataclasses.replace(SPARSE, dense_len=75, variant="B", topk=4)
    model = model_with(sparse, seed=3)
    chunks = (70, 1, 20, 1)
    ids = np.random.default_rng(3).integers(3, 64, (1, sum(chunks))).astype(np.int32)
    ends = np.repeat(np.cumsum(chunks), chunks)                 # key length of each row's call
    ref, dense = reference_logits(sparse, 3, [list(ids[0])], [ends])
    assert np.abs(ref[0][71:] - dense[0, 71:92]).max() > 1e-3   # the sparse rows are sparse
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    cache = KVCache.create(model.config, 1, 128)
    at = 0
    for n in chunks:
        logits, cache = step(model, jnp.asarray(ids[:, at: at + n]), cache)
        np.testing.assert_allclose(np.asarray(logits)[0], ref[0][at: at + n], **TOL)
        at += n


def test_cacheless_forward_is_padding_independent():
    """A left-padded row of a cache-less forward equals the sequence alone, blocks and kernels
    counted from its first real token; a row whose own length is below dense_len is dense
    even when the padded length reaches it."""
    sparse = dataclasses.replace(SPARSE, dense_len=40)
    model = model_with(sparse, seed=4)
    rng = np.random.default_rng(4)
    lens, width = (77, 30, 64), 80
    seqs = [list(rng.integers(3, 64, n)) for n in lens]
    ids, seg, _ = gen_mod.left_pad(seqs)
    assert ids.shape[1] == width
    pos = np.maximum(np.arange(width)[None] - (width - np.asarray(lens))[:, None], 0)
    out = np.asarray(nnx.jit(lambda m, x, s, p: m(x, segment_ids=s, positions=p))(
        model, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)))
    alone, dense = reference_logits(sparse, 4, seqs)            # each row sparse iff n >= 40
    for r, n in enumerate(lens):
        np.testing.assert_allclose(out[r, width - n:], alone[r], err_msg=f"row {r}", **TOL)
    assert np.abs(alone[0] - dense[0, :77]).max() > 1e-3


def test_incremental_kernel_cache_equals_compress_keys():
    """append_keys over a prefill then chunks of 1 and 5 keys, rows with different leading
    padding: the cached kernels and coarse kernels are compress_keys of each row's real keys,
    slots of kernels that do not exist yet stay zero, the tail holds the last keys."""
    cfg = dataclasses.replace(SPARSE, kernel_size=6, kernel_stride=3, block_size=6,
                              window_size=12, lse_approx=True)
    sizes = [(cfg.kernel_size, cfg.kernel_stride),
             coarse_kernel_sizes(cfg.kernel_size, cfg.kernel_stride)]
    b, k, d, s_len = 3, 2, 4, 96
    lead = np.array([0, 5, 17])
    keys = np.asarray(jax.random.normal(jax.random.key(0), (b, s_len, k, d), jnp.float32))
    want = [[np.asarray(compress_keys(jnp.asarray(keys[r:r + 1, lead[r]:]), *kk))[0]
             for r in range(b)] for kk in sizes]                # every kernel of the full rows
    c, cc, r_tail = compressed_cache_sizes(cfg, s_len)
    assert want[0][0].shape[0] == c and want[1][0].shape[0] == cc
    layers = 2                                                  # write layer 1 only
    kernels = jnp.zeros((layers, b, c, k, d))
    coarse = jnp.zeros((layers, b, cc, k, d))
    tail = jnp.zeros((layers, b, r_tail, k, d))
    update = jax.jit(append_keys, static_argnums=(7,))
    start = 0
    for n in (23, 1, 1, 5, 1, 5, 5, 1, 1, 1, 5, 5, 1, 1, 5, 1):
        kernels, coarse, tail = update(kernels, coarse, tail, 1, jnp.asarray(keys[:, start:
                                       start + n]), jnp.int32(start), jnp.asarray(lead), cfg)
        start += n
        for got_all, want_all, (size, stride) in zip((kernels, coarse), want, sizes):
            for row in range(b):
                count = num_kernels(start - lead[row], size, stride)
                got = np.asarray(got_all[1, row])
                np.testing.assert_allclose(got[:count], want_all[row][:count], rtol=1e-6,
                                           atol=1e-6)
                assert not got[count:].any()
        np.testing.assert_array_equal(tail[1, :, max(0, r_tail - start):],
                                      keys[:, max(0, start - r_tail): start])
    assert not np.asarray(kernels[0]).any() and not np.asarray(tail[0]).any()


@pytest.mark.parametrize("name,cfg", [
    ("A", SPARSE),
    ("B_lse_approx", dataclasses.replace(SPARSE, variant="B", topk=5, lse_approx=True)),
])
def test_selection_from_fixed_size_kernel_cache_equals_prefill_at_that_length(name, cfg):
    """The decode selection over a kernel cache of 64 slots' capacity (unused slots zero, 8
    blocks) is the block set the reference selects for the last query of a prefill of exactly
    n keys; row 1 has zero queries, so every visible kernel ties and top-k's tie-breaking
    decides."""
    b, n_heads, kv, d, s_len = 2, 4, 2, 8, 64
    q = jax.random.normal(jax.random.key(1), (b, s_len, n_heads, d)).at[1].set(0.0)
    k = jax.random.normal(jax.random.key(2), (b, s_len, kv, d))
    sizes = [(cfg.kernel_size, cfg.kernel_stride)]
    if cfg.lse_approx:
        sizes.append(coarse_kernel_sizes(cfg.kernel_size, cfg.kernel_stride))
    full = [compress_keys(k, *kk) for kk in sizes]     # kernel c only depends on its own keys
    select = jax.jit(select_from_kernel_cache, static_argnums=(4, 5))
    prefill_mask = jax.jit(block_mask, static_argnums=(2,))
    for n in (4, 17, 30, 41, 56, 64):
        kc, coarse = [jnp.where(jnp.arange(f.shape[1])[:, None, None] < num_kernels(n, *kk), f,
                                0.0) for f, kk in zip(full, sizes)] + [None] * (2 - len(sizes))
        idx, valid = select(q[:, n - 1: n], kc, coarse, jnp.full((b, 1), n - 1), 8, cfg)
        want = np.asarray(prefill_mask(q[:, :n], k[:, :n], cfg))[:, :, -1]   # [B, K, M_n]
        for row in range(b):
            for h in range(kv):
                got = set(np.asarray(idx[row, h, 0])[np.asarray(valid[row, h, 0])].tolist())
                assert got == set(np.flatnonzero(want[row, h]).tolist()), (n, row, h)


def test_sparse_decode_step_updates_caches_in_place():
    """The donated cache (keys, values, kernels, coarse kernels, tail) is the output and no
    cache array is copied or transposed per step."""
    model = model_with(dataclasses.replace(SPARSE, dense_len=48, lse_approx=True))
    b, s = 3, 256
    cache = KVCache.create(model.config, b, s)
    leaves = [x for x in jax.tree.leaves(cache) if x.ndim >= 3]
    assert len(leaves) == 5
    graphdef, state = nnx.split(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "Some donated buffers were not usable" fails here
        hlo = gen_mod._decode_step.lower(graphdef, state, jnp.ones((b,), jnp.int32),
                                         jnp.zeros((b,), jnp.int32), cache, jax.random.key(0),
                                         (0.0, 0, 1.0)).compile().as_text()
    aliases = re.findall(r"\{\d+\}: \(\d+, \{\}, may-alias\)", hlo.splitlines()[0])
    assert len(aliases) >= 7                                  # every cache leaf
    dims = {tuple(sorted(x.shape[i:])) for x in leaves for i in (0, 1)}
    moved = [line for line in hlo.splitlines()
             if (m := re.search(r"= \w+\[([\d,]+)\]\{[\d,]*\} (copy|transpose)\(", line))
             and tuple(sorted(map(int, m.group(1).split(",")))) in dims]
    assert not moved, moved
