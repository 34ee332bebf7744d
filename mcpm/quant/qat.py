"""Ternary quantization-aware training on mcpm's parameter dict, and the record a ternary
checkpoint carries.

The model itself knows nothing of quantization: the train and eval steps hand it
``fake_quantize(params)``, in which every quantized matrix is ``ternary_ste(W)``: the absmean
ternary weight in the forward pass and the identity in the backward pass, so the optimizer
updates the float ("latent") weights while the loss is the ternary model's.

Each parameter is quantized as the matrices its matmuls use, ``[in, out]`` with any leading
layer axis kept apart (one scale per layer, never one per stack):

=========================  =================  ===============================
parameter (mcpm layout)    matrix view        input axis
=========================  =================  ===============================
q, k, v ``[L, H, N, D]``   ``[L, H, N*D]``    H
o ``[L, N, D, H]``         ``[L, N*D, H]``    N*D (both head axes)
gate, up ``[L, H, I]``     as stored          H
down ``[L, I, H]``         as stored          I
lm_head ``[H, V]``         as stored          H
embed ``[V, H]``           ``[H, V]``         H (the tied head's input axis)
=========================  =================  ===============================

A checkpoint written from a QAT run holds the ternary model itself: every quantized matrix is
``q * scale`` exactly (float32), so any reader (mcpm, the official code) runs the ternary
model, and ``quant.json`` beside ``model.yaml`` says which tensors are ternary and how they
are grouped (:func:`recover_ternary` gets q and the scales back exactly).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mcpm.config import ModelConfig, QuantConfig
from mcpm.model.minicpm4 import matrix_dims
from mcpm.quant.ternary import QuantError, dequantize, ternarize, ternary_ste

HIDDEN_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
QUANT_FILE = "quant.json"


def quantized_names(qcfg: QuantConfig, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The parameters ``qcfg`` quantizes (none when quantization is off)."""
    if not qcfg.enabled:
        return ()
    names = HIDDEN_MATRICES
    if qcfg.embeddings:
        names += ("embed",)
    if qcfg.head and not model_cfg.tie_word_embeddings:
        names += ("lm_head",)
    return names


def group_of(qcfg: QuantConfig) -> Optional[int]:
    return qcfg.group_size or None


def as_matrices(name: str, w):
    """``w`` (a parameter in mcpm's layout) viewed as ``[..., in, out]`` matrices."""
    if name == "embed":
        return jnp.swapaxes(w, -1, -2)
    if name == "lm_head":
        return w
    return w.reshape(w.shape[0], *matrix_dims(name, w.shape))


def from_matrices(name: str, m, shape: tuple[int, ...]):
    """Inverse of :func:`as_matrices` for a parameter of ``shape``."""
    if name == "embed":
        return jnp.swapaxes(m, -1, -2)
    return m.reshape(shape)


def fake_quantize(params: dict, qcfg: QuantConfig, model_cfg: ModelConfig) -> dict:
    """``params`` with every quantized matrix replaced by its straight-through ternary weight
    (forward: ``q * scale`` in the parameter's dtype; gradient: the identity)."""
    g = group_of(qcfg)
    out = dict(params)
    for name in quantized_names(qcfg, model_cfg):
        w = params[name]
        out[name] = from_matrices(name, ternary_ste(as_matrices(name, w), g), w.shape)
    return out


def ternarize_params(params: dict, qcfg: QuantConfig, model_cfg: ModelConfig) -> dict:
    """The ternary model's parameters as host float32 arrays: quantized matrices are exactly
    ``q * scale``; the rest are returned as given."""
    g = group_of(qcfg)
    out = dict(params)
    for name in quantized_names(qcfg, model_cfg):
        w = jnp.asarray(params[name])
        q, s = ternarize(as_matrices(name, w), g)
        out[name] = np.asarray(from_matrices(name, dequantize(q, s), w.shape))
    return out


def quant_stats(params: dict, qcfg: QuantConfig, model_cfg: ModelConfig) -> dict:
    """Per quantized matrix name (over its layers): ``quant_zeros_NAME``, the fraction of
    ternary zeros, and ``quant_scale_NAME`` / ``quant_scale_min_NAME`` /
    ``quant_scale_max_NAME``, the mean, least and largest scale."""
    g = group_of(qcfg)
    stats = {}
    for name in quantized_names(qcfg, model_cfg):
        q, s = ternarize(as_matrices(name, params[name]), g)
        stats[f"quant_zeros_{name}"] = jnp.mean((q == 0).astype(jnp.float32))
        stats[f"quant_scale_{name}"] = jnp.mean(s)
        stats[f"quant_scale_min_{name}"] = jnp.min(s)
        stats[f"quant_scale_max_{name}"] = jnp.max(s)
    return stats


def distill_kl_sum(student_btv, teacher_btv, weights_bt, temperature: float = 1.0):
    """``sum_t w_t * T^2 * KL(softmax(teacher_t / T) || softmax(student_t / T))`` in float32
    (the T^2 keeps the gradient's size independent of the temperature)."""
    s = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_btv.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return jnp.sum(kl * weights_bt) * temperature ** 2


# --------------------------------------------------------------------------------------------
# the record in a checkpoint
# --------------------------------------------------------------------------------------------

def quant_info(qcfg: QuantConfig, model_cfg: ModelConfig) -> dict:
    return {"method": qcfg.method, "group_size": qcfg.group_size,
            "tensors": list(quantized_names(qcfg, model_cfg))}


def read_quant_info(ckpt_dir: str | Path) -> Optional[dict]:
    """A checkpoint's ``quant.json`` (None when it has none: a float model)."""
    path = Path(ckpt_dir) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if not (isinstance(info, dict) and info.get("method") == "ternary"
                and isinstance(info.get("group_size"), int)
                and isinstance(info.get("tensors"), list)):
            raise ValueError("expected method 'ternary', an int group_size and a tensor list")
    except (OSError, ValueError) as e:
        raise QuantError(f"{path}: not a readable quantization record ({e})") from None
    return info


def recover_ternary(w, group_size: int = 0, name: str = "weight"):
    """``(q int8, scale float32)`` of a matrix ``[..., in, out]`` that holds ``q * scale``
    exactly (a ternary checkpoint's): each group's scale is its largest |w|. Raises QuantError
    naming ``name`` when ``w`` is not such a matrix."""
    w = np.asarray(w, np.float32)
    lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
    g = group_size or n_in
    if n_in % g:
        raise QuantError(f"{name}: group_size {group_size} does not divide its input "
                         f"dimension {n_in}")
    grouped = w.reshape(*lead, n_in // g, g, n_out)
    scale = np.abs(grouped).max(axis=-2, keepdims=True)
    if group_size == 0:
        scale = scale.max(axis=-1, keepdims=True)
    q = np.where(scale > 0, np.round(grouped / np.where(scale > 0, scale, 1)), 0)
    if not np.array_equal(q * scale, grouped):
        raise QuantError(f"{name} is not a ternary matrix q * scale with "
                         f"{'one scale per matrix' if not group_size else f'groups of {g}'}: "
                         "it was not written by a ternary QAT run (or with another group size)")
    scale = scale[..., 0, :] if group_size else scale[..., 0, :, :]
    return q.reshape(w.shape).astype(np.int8), scale.astype(np.float32)
