"""Random attention inputs shared by the attention tests (not a test module)."""
import jax.numpy as jnp
import numpy as np


def qkv(seed, b, t, n, kv, d, dtype=np.float32):
    """q [B, T, N, D] (scale 2, so softmaxes are not flat), k and v [B, T, K, D]."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray((rng.standard_normal(s) * sc).astype(dtype)) for s, sc in
                 (((b, t, n, d), 2.0), ((b, t, kv, d), 1.0), ((b, t, kv, d), 1.0)))


def packed_segments(b, t, seed, min_padding=0):
    """[B, T] segment ids: rows of three documents each, then trailing padding (segment 0) of
    a random length in [min_padding, t // 3)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        length = t - int(rng.integers(min_padding, t // 3))
        cuts = np.sort(rng.choice(np.arange(1, length), size=2, replace=False))
        seg[row, :length] = 1 + np.searchsorted(cuts, np.arange(length), side="right")
    return jnp.asarray(seg)


def attention_atol(q, k, v):
    """Absolute tolerance for comparing two float32 attention outputs of the same inputs.

    Each implementation rounds a score s = q.k / sqrt(D) with an error up to about
    u * sum_d |q_d k_d| / sqrt(D) (u = eps / 2, the unit roundoff), and a score error shifts the
    output by at most twice that times max |v| (softmax weights sum to 1). Two implementations,
    each with its own rounding: 2 x 2 x u = 2 eps. The bound grows with D and the inputs' scale,
    which a fixed atol ignores (at D = 128 the reduction order alone moves outputs by ~4e-6).
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    qa = np.abs(np.asarray(q, np.float32)).reshape(b, t, kv, n // kv, d)
    ka = np.abs(np.asarray(k, np.float32))
    dot_abs = np.einsum("btkgd,bskd->bkgts", qa, ka, optimize=True).max() / np.sqrt(d)
    return float(2 * np.finfo(np.float32).eps * dot_abs * np.abs(np.asarray(v)).max())
