"""The gathered plain-JAX InfLLM v2 path against the dense reference: forward and gradients,
awkward lengths, packed/padded batches, and memory that grows linearly in T."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import packed_segments, qkv

import mcpm
from mcpm.config import SparseConfig
from mcpm_kernels.infllmv2.reference import attention_reference
from mcpm_kernels.infllmv2.xla import attention_xla

SMALL = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16,
                     topk=3, use_nope=False, dense_len=-1)


@pytest.mark.parametrize("t,n,kv,cfg", [
    (70, 4, 2, SMALL),                                    # T not a multiple of the block
    (5, 4, 2, SMALL),                                     # shorter than one block and one kernel
    (131, 6, 3, dataclasses.replace(SMALL, topk=2, init_blocks=2)),
    (63, 4, 2, dataclasses.replace(SMALL, dense_len=64)),  # just below dense_len: dense
    (64, 4, 2, dataclasses.replace(SMALL, dense_len=64)),  # at dense_len: sparse
    (96, 8, 1, dataclasses.replace(SMALL, window_size=8)),  # window of one block, G = 8
    (90, 4, 2, dataclasses.replace(SMALL, variant="B", topk=5)),
    (90, 4, 2, dataclasses.replace(SMALL, variant="B", topk=6, lse_approx=True)),
])
def test_forward_and_gradients_match_reference(t, n, kv, cfg):
    q, k, v = qkv(t, 2, t, n, kv, 8)
    seg = packed_segments(2, t, t)
    for segment_ids in (None, seg):
        ref = attention_reference(q, k, v, cfg, segment_ids)
        out = attention_xla(q, k, v, cfg, segment_ids)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-6)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    grads = [jax.grad(lambda q, k, v: (f(q, k, v, cfg, seg) * ct).sum(), (0, 1, 2))(q, k, v)
             for f in (attention_reference, attention_xla)]
    for g_ref, g_out in zip(*grads):
        np.testing.assert_allclose(np.asarray(g_out), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float32_reference():
    q, k, v = qkv(3, 1, 100, 4, 2, 16)
    ref = attention_reference(q, k, v, SMALL)
    out = attention_xla(*(x.astype(jnp.bfloat16) for x in (q, k, v)), SMALL)
    assert out.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert err < 2e-2


def test_public_api_auto_is_the_gathered_path():
    q, k, v = qkv(4, 1, 40, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(mcpm.infllmv2_attention(q, k, v, SMALL)),
                                  np.asarray(attention_xla(q, k, v, SMALL)))


def test_memory_grows_linearly_in_t():
    """Compiled temporaries of forward+backward: doubling T must not quadruple them."""
    cfg = SparseConfig(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                       window_size=128, topk=4, use_nope=False, dense_len=-1)

    def temp_bytes(t):
        shapes = [jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)] + \
                 [jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)] * 2
        loss = lambda q, k, v: attention_xla(q, k, v, cfg).sum()
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return fn.trace(*shapes).lower().compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(8192)
    assert large < 2.6 * small, (small, large)
    # and far below one T x T float32 buffer per kv head
    assert large < 0.25 * 2 * 8192 * 8192 * 4
