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


def test_chunked_sums_equal_the_whole_sequence_values_and_gradients():
    """T = 45 in chunks of 8 (a ragged last chunk): the same sums, and the same gradients for the
    hidden states and the head's weights, as the logits of the whole sequence at once."""
    from mcpm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
    rng = np.random.default_rng(1)
    b, t, h, v = 2, 45, 16, 53
    hidden = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    w_head = jnp.asarray(rng.standard_normal((h, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    weights = jnp.asarray((rng.random((b, t)) > 0.2).astype(np.float32))

    def loss(fn, hid, w):
        sums = fn(hid, w)
        return sums["nll"] + 1e-3 * sums["z"], sums

    whole = lambda hid, w: cross_entropy_sums(hid @ w, targets, weights)
    chunked = lambda hid, w: chunked_cross_entropy_sums(hid, lambda x: x @ w, targets, weights, 8)
    (_, ref), g_ref = jax.value_and_grad(loss, (1, 2), has_aux=True)(whole, hidden, w_head)
    (_, out), g_out = jax.value_and_grad(loss, (1, 2), has_aux=True)(chunked, hidden, w_head)
    # the same B x T non-negative terms summed in another order: each order is within
    # (B x T) u of the exact sum (u = eps / 2), so the two within (B x T) eps of each other
    rtol = b * t * np.finfo(np.float32).eps
    for key in ("nll", "z", "tokens"):
        np.testing.assert_allclose(float(out[key]), float(ref[key]), rtol=rtol)
    for g, r in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                                   atol=rtol * float(np.abs(r).max()))


def test_chunked_loss_never_holds_the_whole_logits():
    """Compiled memory of the gradient: the whole-sequence loss needs at least one [B, T, V]
    float32 array; the chunked one a few [B, chunk, V] ones (logits and their gradient of the
    piece being processed), whatever T."""
    from mcpm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
    b, t, h, v, chunk = 2, 1024, 32, 8192, 64
    args = (jax.ShapeDtypeStruct((b, t, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))

    def temp_bytes(fn):
        grad = jax.grad(lambda hid, w, tg, wt: fn(hid, w, tg, wt)["nll"], (0, 1))
        return jax.jit(grad).trace(*args).lower().compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    whole = temp_bytes(lambda hid, w, tg, wt: cross_entropy_sums(hid @ w, tg, wt))
    chunked = temp_bytes(lambda hid, w, tg, wt: chunked_cross_entropy_sums(
        hid, lambda x: x @ w, tg, wt, chunk))
    assert whole >= logits_bytes
    assert chunked < 4 * b * chunk * v * 4, (chunked, whole, logits_bytes)   # measured: 2.4
