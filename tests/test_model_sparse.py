"""A MiniCPM4 with a sparse_config runs InfLLM v2 through the attention seam, and trains."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpm.config import ModelConfig, SparseConfig
from mcpm.model import KVCache, MiniCPM4

SPARSE = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16,
                      topk=2, use_nope=False, dense_len=-1)
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            dim_model_base=8, eos_token_id=(2,), initializer_range=0.5)


def model_with(sparse, seed=0):
    return MiniCPM4(ModelConfig(**BASE, sparse_config=sparse), rngs=nnx.Rngs(seed))


def logits_of(sparse, ids, **kw):
    return np.asarray(nnx.jit(lambda m, x: m(x, **kw))(model_with(sparse), ids))


def test_sparse_equals_dense_when_every_block_is_chosen_and_differs_otherwise():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 90)), jnp.int32)
    dense = logits_of(None, ids)
    everything = logits_of(dataclasses.replace(SPARSE, topk=100), ids)
    np.testing.assert_allclose(everything, dense, rtol=1e-5, atol=1e-5)
    sparse = logits_of(SPARSE, ids)
    assert np.abs(sparse - dense).max() > 1e-3  # the selection really drops blocks
    np.testing.assert_allclose(sparse[:, :24], dense[:, :24], rtol=1e-5, atol=1e-5)  # window


def test_dense_below_dense_len():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 40)), jnp.int32)
    np.testing.assert_allclose(logits_of(dataclasses.replace(SPARSE, dense_len=64), ids),
                               logits_of(None, ids), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_sparse_attention():
    model = model_with(SPARSE)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 80)), jnp.int32)

    def loss(m):
        logits = m(ids[:, :-1])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

    grads = nnx.grad(loss)(model)
    for name in ("q", "k", "v", "o", "embed"):
        g = np.asarray(getattr(grads, name)[...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_kv_cache_keeps_compressed_keys_only_when_sparse_can_apply():
    """A dense model's cache holds exactly the dense arrays; so does a sparse one whose dense_len
    exceeds the cache (it never leaves dense attention there), and it decodes like the dense
    model. A cache without compressed keys is refused clearly where InfLLM v2 needs them."""
    dense_cache = KVCache.create(model_with(None).config, 2, 64)
    assert dense_cache.kernels is None and dense_cache.key_tail is None
    assert len(jax.tree.leaves(dense_cache)) == 4
    short = model_with(dataclasses.replace(SPARSE, dense_len=65))
    assert len(jax.tree.leaves(KVCache.create(short.config, 2, 64))) == 4
    sparse = model_with(SPARSE)
    cache = KVCache.create(sparse.config, 2, 64)
    assert cache.kernels.shape == (2, 2, 31, 2, 8) and cache.key_tail.shape == (2, 2, 3, 2, 8)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 9)), jnp.int32)
    step = nnx.jit(lambda m, x, c: m(x, cache=c)[0])
    np.testing.assert_array_equal(step(short, ids, KVCache.create(short.config, 2, 64)),
                                  step(model_with(None), ids, dense_cache))
    with pytest.raises(ValueError, match="no compressed keys"):
        sparse(ids, cache=dense_cache)


def test_use_nope_scores_blocks_with_pre_rope_keys():
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 90)), jnp.int32)
    nope = logits_of(dataclasses.replace(SPARSE, use_nope=True), ids)
    rope = logits_of(SPARSE, ids)
    assert np.isfinite(nope).all()
    assert np.abs(nope - rope).max() > 1e-4  # other keys score the blocks: other selection
    # the window covers the first 24 positions: there both attend to every past key
    np.testing.assert_allclose(nope[:, :16], rope[:, :16], rtol=1e-5, atol=1e-5)
