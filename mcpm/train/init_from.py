"""``train.init_from``: the weights a fresh run starts from (stage 2 of BitCPM4's recipe: QAT
on top of a trained float model), read from an mcpm checkpoint or an official HF directory.

Only the weights carry over; the optimizer state and the schedule (warm-up included) start
afresh. The checkpoint must hold the architecture the config describes: every difference is
listed before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mcpm.config import Config, ConfigError, to_dict
from mcpm.model.minicpm4 import param_shapes

# ModelConfig fields that decide what the weights compute; the rest say how to run them
# (dtypes, remat, kernels) or only how a fresh model is initialised
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rope_theta", "rope_scaling", "rms_norm_eps", "scale_emb", "scale_depth",
                "dim_model_base", "tie_word_embeddings", "sparse_config")


def load_init_params(cfg: Config) -> dict[str, np.ndarray]:
    """The float32 parameters of ``cfg.train.init_from``, checked against ``cfg.model``."""
    from mcpm.api import load_params
    from mcpm.quant.qat import QUANT_FILE, read_quant_info

    path = Path(cfg.train.init_from)
    info = read_quant_info(path) if path.is_dir() else None
    if info is not None and cfg.quant.enabled:
        raise ConfigError(
            f"train.init_from={path} is already a ternary model ({path / QUANT_FILE}): "
            "quantization-aware training starts from the float model. Give the float "
            "checkpoint it came from, or resume the QAT run's own workdir to train it further")
    src_cfg, _, params = load_params(path, param_dtype="float32")
    mine, theirs = to_dict(cfg.model), to_dict(src_cfg)
    diffs = [f"model.{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in ARCHITECTURE
             if mine[k] != theirs[k]]
    if diffs:
        raise ConfigError(f"train.init_from={path} holds another architecture than this "
                          f"config's model: {'; '.join(diffs)}. Make the config's model section "
                          "match the checkpoint's")
    shapes = param_shapes(cfg.model)
    if set(params) != set(shapes):
        raise ConfigError(f"train.init_from={path}: tensors {sorted(params)} do not match the "
                          f"model's {sorted(shapes)}")
    return {k: np.asarray(v, np.float32) for k, v in params.items()}
