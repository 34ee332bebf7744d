"""The memory-efficient dense attention (the InfLLM v2 benchmarks' dense baseline) against the
model's plain dense attention: forward and gradients, odd lengths, GQA, packed/padded rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import packed_segments, qkv

from mcpm.model.attention import dense_attention
from mcpm_kernels.dense_attention import dense_attention_xla


def plain(q, k, v, seg=None):
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return dense_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0], t, t)))


@pytest.mark.parametrize("t,n,kv,q_chunk,k_chunk", [
    (1, 4, 2, 8, 16),
    (37, 4, 2, 8, 16),          # odd length, several key chunks
    (70, 6, 3, 16, 16),         # q_chunk == k_chunk
    (101, 8, 1, 8, 40),         # k_chunk rounded up to a multiple of q_chunk, G = 8
    (64, 4, 4, 64, 512),        # one tile (defaults larger than T), G = 1
])
@pytest.mark.parametrize("segments", [False, True])
def test_forward_and_gradients_match_dense(t, n, kv, q_chunk, k_chunk, segments):
    q, k, v = qkv(t, 2, t, n, kv, 16)
    seg = packed_segments(2, t, t, min_padding=1) if segments and t > 8 else None
    f = lambda q, k, v: dense_attention_xla(q, k, v, seg, q_chunk=q_chunk, k_chunk=k_chunk)
    ref = plain(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(ref), rtol=1e-5, atol=2e-6)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    g_ref = jax.grad(lambda q, k, v: (plain(q, k, v, seg) * ct).sum(), (0, 1, 2))(q, k, v)
    g_out = jax.jit(jax.grad(lambda q, k, v: (f(q, k, v) * ct).sum(), (0, 1, 2)))(q, k, v)
    for a, r in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=2e-5)


def test_bfloat16_inputs():
    q, k, v = qkv(3, 1, 50, 4, 2, 16)
    ref = plain(q, k, v)
    out = dense_attention_xla(*(x.astype(jnp.bfloat16) for x in (q, k, v)), q_chunk=8, k_chunk=16)
    assert out.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert err < 2e-2


def test_memory_linear_in_t():
    """Compiled temporaries of forward+backward: doubling T must not quadruple them, and stay far
    below one T x T float32 buffer."""
    def temp_bytes(t):
        shapes = [jax.ShapeDtypeStruct((1, t, 8, 32), jnp.float32)] + \
                 [jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)] * 2
        loss = lambda q, k, v: dense_attention_xla(q, k, v).sum()
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return fn.trace(*shapes).lower().compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(8192)
    assert large < 2.6 * small, (small, large)
    assert large < 0.1 * 8192 * 8192 * 4
