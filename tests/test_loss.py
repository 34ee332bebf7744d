"""Cross-entropy with weights and z-loss against numpy, value and gradient."""
import jax
import jax.numpy as jnp
import numpy as np

from mcpm.train.loss import cross_entropy


def numpy_loss(logits, targets, w, z_loss):
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    return (nll * w).sum() / w.sum() + z_loss * (lse ** 2 * w).sum() / w.sum()


def test_matches_numpy_and_ignores_zero_weight_slots():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 11, 37)) * 3).astype(np.float32)
    targets = rng.integers(0, 37, (3, 11))
    w = (rng.random((3, 11)) > 0.3).astype(np.float32)
    w[1, 4], w[0, 0] = 1.0, 0.0
    loss, metrics = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(w), 1e-3)
    np.testing.assert_allclose(float(loss), numpy_loss(logits, targets, w, 1e-3), rtol=1e-5)
    assert float(metrics["tokens"]) == w.sum()
    g = jax.grad(lambda x: cross_entropy(x, jnp.asarray(targets), jnp.asarray(w), 1e-3)[0])(
        jnp.asarray(logits))
    assert np.all(np.asarray(g)[w == 0] == 0)  # masked slots get no gradient
    eps, idx = 1e-3, (1, 4, 5)
    lp, lm = logits.copy(), logits.copy()
    lp[idx] += eps
    lm[idx] -= eps
    num = (numpy_loss(lp, targets, w, 1e-3) - numpy_loss(lm, targets, w, 1e-3)) / (2 * eps)
    np.testing.assert_allclose(float(g[idx]), num, rtol=1e-3, atol=1e-6)


def test_all_masked_batch_gives_zero_not_nan():
    loss, metrics = cross_entropy(jnp.zeros((1, 4, 5)), jnp.zeros((1, 4), jnp.int32),
                                  jnp.zeros((1, 4)))
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
