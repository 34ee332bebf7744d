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
