"""The Hugging Face-style entry points: ``from_pretrained`` and friends."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.checkpoint import is_mcpm_checkpoint, load_checkpoint
from mcpm.config import ModelConfig, SparseConfig, from_dict
from mcpm.hf import CheckpointError, is_hf_dir, read_hf_checkpoint
from mcpm.model.minicpm4 import DTYPES, MiniCPM4
from mcpm.quant.packed import is_packed_checkpoint, load_packed, packed_model
from mcpm_kernels.infllmv2 import infllmv2_attention as _infllmv2_attention
from mcpm_kernels.infllmv2 import infllmv2_block_mask as _infllmv2_block_mask


def load_params(path: str | Path, progress: bool = False, **run_options
                ) -> tuple[ModelConfig, dict | None, dict[str, np.ndarray]]:
    """(config, HF config template, numpy params) from an HF directory or an mcpm checkpoint.

    A packed ternary checkpoint (:mod:`mcpm.quant.packed`) gives the ternary model's float
    parameters (its matrices unpacked to float32 ``q * scale``); :func:`from_pretrained` keeps
    them packed instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give an mcpm checkpoint directory "
                              "(model.yaml + params/) or a Hugging Face model directory "
                              "(config.json + model.safetensors)")
    if is_packed_checkpoint(path):
        ckpt = load_packed(path, **run_options)
        return ckpt.cfg, ckpt.template, ckpt.float_params()
    if is_mcpm_checkpoint(path):
        return load_checkpoint(path, **run_options)
    if is_hf_dir(path):
        return read_hf_checkpoint(path, progress=progress, **run_options)
    raise CheckpointError(f"{path} is neither an mcpm checkpoint (model.yaml + params/) nor a "
                          "Hugging Face directory (config.json + model.safetensors[.index.json])")


def model_from_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> MiniCPM4:
    """Build a MiniCPM4 holding ``params`` (cast to ``cfg.param_dtype``) without a random init."""
    abstract = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    dtype = DTYPES[cfg.param_dtype]
    pure = {name: jnp.asarray(value, dtype) for name, value in params.items()}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def params_of(model: MiniCPM4) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays, by mcpm name."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {name: np.asarray(jax.device_get(value)) for name, value in pure.items()}


def from_pretrained(path: str | Path, *, param_dtype: str | None = None,
                    compute_dtype: str | None = None, attention_impl: str | None = None,
                    sparse_attention_impl: str | None = None,
                    matmul_precision: str | None = None,
                    progress: bool = False) -> MiniCPM4:
    """Load a MiniCPM4 from an official HF directory or an mcpm checkpoint.

    Parameters are float32 unless ``param_dtype`` says otherwise, whatever the file holds. A
    packed ternary checkpoint (``mcpm quant export ... --format packed``) gives a model that
    keeps its layer matrices as ternary bytes and scales and unpacks one layer at a time in the
    forward pass (:mod:`mcpm.quant.packed`).
    ``attention_impl`` / ``sparse_attention_impl`` / ``matmul_precision``: see
    :class:`mcpm.config.ModelConfig`.
    """
    run_options = {k: v for k, v in (("param_dtype", param_dtype),
                                     ("compute_dtype", compute_dtype),
                                     ("attention_impl", attention_impl),
                                     ("sparse_attention_impl", sparse_attention_impl),
                                     ("matmul_precision", matmul_precision))
                   if v is not None}
    if is_packed_checkpoint(path):
        return packed_model(load_packed(path, **run_options))
    cfg, _, params = load_params(path, progress=progress, **run_options)
    return model_from_params(cfg, params)


def _sparse_config(sparse_config) -> SparseConfig:
    """An official ``sparse_config`` dict (a config.json's block) as a checked SparseConfig."""
    if isinstance(sparse_config, Mapping):
        return from_dict(SparseConfig, dict(sparse_config), "sparse_config")
    return sparse_config


def infllmv2_attention(q_btnd, k_btkd, v_btkd, sparse_config, **kwargs):
    """:func:`mcpm_kernels.infllmv2.infllmv2_attention` (see there), taking ``sparse_config`` as
    a :class:`SparseConfig` or as the official dict."""
    return _infllmv2_attention(q_btnd, k_btkd, v_btkd, _sparse_config(sparse_config), **kwargs)


def infllmv2_block_mask(q_btnd, k_btkd, sparse_config, **kwargs):
    """:func:`mcpm_kernels.infllmv2.infllmv2_block_mask` (see there), taking ``sparse_config``
    as a :class:`SparseConfig` or as the official dict."""
    return _infllmv2_block_mask(q_btnd, k_btkd, _sparse_config(sparse_config), **kwargs)
