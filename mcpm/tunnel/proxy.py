"""Proxy models: a config at another width, under muP or standard parametrisation, with the
searched hyperparameters set.

muP (training spec section 2, m = hidden_size / dim_model_base): hidden-matrix init std
``init_std / sqrt(m)``, hidden-matrix Adam lr ``lr / m``, logits divided by m. Standard
parametrisation (SP) here keeps the same fan-in initialisation at every width but drops the lr
and logit multipliers: ``dim_model_base = hidden_size`` (m = 1) with ``initializer_range`` set
to what muP's init would be at that width. So the two differ only in what muP transfers.
"""
from __future__ import annotations

import dataclasses
import math

from mcpm.config import Config, ConfigError

PARAMETRIZATIONS = ("mup", "sp")


def at_width(cfg: Config, width: int, parametrization: str = "mup") -> Config:
    """``cfg`` with ``hidden_size = width``: the head size, the query heads per key/value head
    and the MLP ratio stay; depth stays (muP transfers across width)."""
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"parametrization must be one of {list(PARAMETRIZATIONS)}, got "
                          f"{parametrization!r}")
    m = cfg.model
    d, groups = m.head_dim, m.num_groups
    if width % (d * groups):
        raise ConfigError(f"width {width} must be a multiple of head_dim x query heads per kv "
                          f"head = {d} x {groups} = {d * groups} (head_dim = hidden_size / "
                          f"num_attention_heads of the base config, {m.hidden_size} / "
                          f"{m.num_attention_heads})")
    heads = width // d
    model = dataclasses.replace(
        m, hidden_size=width, num_attention_heads=heads, num_key_value_heads=heads // groups,
        intermediate_size=int(round(width * m.intermediate_size / m.hidden_size)))
    if parametrization == "sp":
        mup_std = m.initializer_range / math.sqrt(width / m.dim_model_base)
        model = dataclasses.replace(model, dim_model_base=float(width), initializer_range=mup_std)
    return dataclasses.replace(cfg, model=model)


def with_hparams(cfg: Config, **values) -> Config:
    """``cfg`` with the searchable settings set: ``peak_lr``, ``init_std`` (the base init std,
    ``model.initializer_range``), ``scale_emb``, ``scale_depth``, ``batch_size``."""
    model, train, data = cfg.model, cfg.train, cfg.data
    for name, value in values.items():
        if name == "peak_lr":
            train = dataclasses.replace(
                train, schedule=dataclasses.replace(train.schedule, peak_lr=float(value)))
        elif name == "init_std":
            model = dataclasses.replace(model, initializer_range=float(value))
        elif name in ("scale_emb", "scale_depth"):
            model = dataclasses.replace(model, **{name: float(value)})
        elif name == "batch_size":
            data = dataclasses.replace(data, batch_size=int(value))
        else:
            raise ConfigError(f"{name!r} is not a searchable setting (peak_lr, init_std, "
                              "scale_emb, scale_depth, batch_size)")
    return dataclasses.replace(cfg, model=model, train=train, data=data)


def hparams_of(cfg: Config) -> dict:
    """The searchable settings of ``cfg`` (the inverse of :func:`with_hparams`)."""
    return {"peak_lr": cfg.train.schedule.peak_lr, "init_std": cfg.model.initializer_range,
            "scale_emb": cfg.model.scale_emb, "scale_depth": cfg.model.scale_depth,
            "batch_size": cfg.data.batch_size}


def non_embedding_params(cfg: Config) -> int:
    """N of the scaling laws: parameters outside the embedding and the output head."""
    m = cfg.model
    return m.num_params() - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
