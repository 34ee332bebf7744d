"""Absmean ternary weight quantization (BitNet b1.58 form) for BitCPM4-style QAT.

Layout
------
mcpm's weight matrices are ``[in, out]``; stacked layers are ``[..., in, out]`` (e.g.
``[L, in, out]``).  The INPUT axis is always axis ``-2`` and every leading axis is a batch of
independent matrices.  A 1-D array ``[in]`` is treated as a single column ``[in, 1]``.

* ``group_size=None`` (per matrix): ``scale = mean(|W|)`` over the last two axes, one scale per
  matrix, shaped ``[..., 1, 1]`` (``[1]`` for a 1-D array).  A stacked ``[L, in, out]`` array
  therefore gets one scale per layer, ``[L, 1, 1]``, never one for the whole stack.
* ``group_size=g`` (``g`` must divide ``in``): ``g`` consecutive rows along the input axis form a
  group, separately for each output column; ``scale`` is shaped ``[..., in // g, out]``
  (``[in // g]`` for a 1-D array).  ``scale[..., j, o] = mean(|W[..., j*g:(j+1)*g, o]|)``.

``q = clip(round(W / scale), -1, 1)`` stored as int8, where ``round`` is ``jnp.round``: round
half to even (so |W| = scale/2 exactly gives 0, 3*scale/2 gives +-2 -> clipped to +-1).  The scale
is computed in float32 whatever W's dtype is.  An all-zero matrix/group has ``scale == 0`` and
``q == 0`` (the division uses a denominator of 1 there, so no NaN appears).

``dequantize(q, scale)`` returns ``q * scale`` broadcast back to q's shape, in float32 (or
``dtype``).  ``ternary_ste(w)`` returns ``dequantize(*ternarize(w))`` in w's dtype in the forward
pass, and its derivative is the identity on w (straight-through estimator).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mcpm.config import UserError


class QuantError(UserError, ValueError):
    """Bad input to the quantization helpers (group size, packed blob, format, values)."""


def _divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def _check_group_size(group_size, in_dim: int) -> Optional[int]:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise QuantError(f"group_size must be a positive int or None, got {group_size!r}")
    g = int(group_size)
    if g <= 0 or in_dim % g != 0:
        divs = _divisors(in_dim) if in_dim > 0 else []
        shown = ", ".join(str(d) for d in divs[:16]) + (", ..." if len(divs) > 16 else "")
        raise QuantError(
            f"group_size={g} does not divide the input dimension {in_dim} (axis -2 of the "
            f"weight); use one of its divisors: {shown}, or group_size=None for one scale per "
            f"matrix")
    return g


def _as_matrix(w):
    """View w as [..., in, out]; return (w2, was_1d)."""
    w = jnp.asarray(w)
    if w.ndim == 0:
        raise QuantError("cannot ternarize a scalar: expected a weight of shape [..., in, out] "
                         "or [in]")
    if w.ndim == 1:
        return w[:, None], True
    return w, False


def ternarize(w, group_size: Optional[int] = None):
    """Absmean ternary quantization; returns ``(q int8 in {-1, 0, 1}, scale float32)``.

    See the module docstring for the scale layout (per matrix ``[..., 1, 1]`` or per group
    ``[..., in // group_size, out]``)."""
    w2, was_1d = _as_matrix(w)
    in_dim, out_dim = w2.shape[-2], w2.shape[-1]
    g = _check_group_size(group_size, in_dim)
    w32 = w2.astype(jnp.float32)
    lead = w2.shape[:-2]
    if g is None:
        scale = jnp.mean(jnp.abs(w32), axis=(-2, -1), keepdims=True)     # [..., 1, 1]
        grouped = w32[..., None, :, :]                                     # [..., 1, in, out]
        s_b = scale[..., None, :, :]                                       # [..., 1, 1, 1]
    else:
        grouped = w32.reshape(lead + (in_dim // g, g, out_dim))           # [..., G, g, out]
        scale = jnp.mean(jnp.abs(grouped), axis=-2)                        # [..., G, out]
        s_b = scale[..., :, None, :]
    safe = jnp.where(s_b > 0, s_b, jnp.ones_like(s_b))
    q = jnp.clip(jnp.round(grouped / safe), -1, 1).astype(jnp.int8)
    q = q.reshape(w2.shape)
    if was_1d:
        q = q[:, 0]
        scale = scale[:, 0]
    return q, scale


def dequantize(q, scale, dtype=None):
    """``q * scale`` broadcast to q's shape (inverse layout of :func:`ternarize`)."""
    q = jnp.asarray(q)
    scale = jnp.asarray(scale)
    was_1d = q.ndim == 1
    if was_1d:
        q = q[:, None]
        scale = scale[:, None]
    if q.ndim < 2 or scale.ndim != q.ndim:
        raise QuantError(f"scale of shape {tuple(scale.shape)} does not match q of shape "
                         f"{tuple(q.shape)}: expected [..., 1, 1] or [..., in // g, out]")
    in_dim, out_dim = q.shape[-2], q.shape[-1]
    n_groups = scale.shape[-2]
    if (n_groups == 0 or in_dim % n_groups != 0 or scale.shape[-1] not in (1, out_dim)
            or scale.shape[:-2] != q.shape[:-2]):
        raise QuantError(f"scale of shape {tuple(scale.shape)} does not match q of shape "
                         f"{tuple(q.shape)}: expected [..., 1, 1] or [..., in // g, out]")
    lead = q.shape[:-2]
    grouped = q.reshape(lead + (n_groups, in_dim // n_groups, out_dim))
    out = (grouped.astype(scale.dtype) * scale[..., :, None, :]).reshape(q.shape)
    if was_1d:
        out = out[:, 0]
    return out if dtype is None else out.astype(dtype)


@jax.custom_jvp
def _ste_identity(w, w_hat):
    return w_hat


@_ste_identity.defjvp
def _ste_identity_jvp(primals, tangents):
    w, w_hat = primals
    t_w, _ = tangents
    return w_hat, t_w


def ternary_ste(w, group_size: Optional[int] = None):
    """Straight-through ternary weight: forward ``dequantize(*ternarize(w))`` in w's dtype,
    derivative the identity on ``w``.

    Equivalent to ``w + stop_gradient(w_hat - w)`` but the forward value is exactly ``w_hat``
    (that expression rounds twice in bf16), and the gradient is exactly the incoming cotangent.
    jit-able; works for forward and reverse mode."""
    w = jnp.asarray(w)
    w_hat = jax.lax.stop_gradient(dequantize(*ternarize(w, group_size), dtype=w.dtype))
    return _ste_identity(w, w_hat)
