"""mcpm's own checkpoint directory: an orbax parameter tree plus the config and tokenizer.

Layout of a directory written by :func:`save_checkpoint`::

    model.yaml          the ModelConfig (mcpm.config.to_dict)
    hf_config.json      the config.json the weights came with, if any (exact HF round trips)
    params/             orbax StandardCheckpointer tree {name: array}, dtypes as given
    tokenizer.model     ... and the other tokenizer files and generation_config.json, when known
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from mcpm.config import ConfigError, ModelConfig, from_dict, to_dict
from mcpm.hf import (CheckpointError, atomic_output_dir, check_params, copy_aux_files,
                     count_nonfinite, warn_nonfinite)

MODEL_YAML = "model.yaml"
HF_TEMPLATE = "hf_config.json"
PARAMS_DIR = "params"


def is_mcpm_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_YAML).is_file() and (path / PARAMS_DIR).is_dir()


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


# Parameters are written one 64 MiB chunk at a time, at most ~0.25 GB in flight, from the
# caller's arrays (orbax would otherwise deep-copy every host array first and buffer the OCDBT
# output: 1.8x the parameters on top of them). Any orbax reader restores this format.
_SAVE_CHUNK_BYTES = 64 * 2**20
_SAVE_CONCURRENT_GB = 0.25


def _save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, save_concurrent_gb=_SAVE_CONCURRENT_GB,
                                          type_handler_registry=registry)
    save_args = {k: ocp.SaveArgs(chunk_byte_size=_SAVE_CHUNK_BYTES) for k in params}
    with ocp.Checkpointer(handler) as ckpt:
        ckpt.save(path, args=ocp.args.PyTreeSave(dict(params), save_args=save_args))


def save_checkpoint(out_dir: str | Path, cfg: ModelConfig, params: dict[str, np.ndarray], *,
                    hf_config_template: dict | None = None, aux_dir: str | Path | None = None,
                    overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a complete mcpm checkpoint directory atomically (refuses an existing one unless
    ``overwrite``). ``extra_files``: {file name: text} written beside model.yaml (e.g. a
    ternary model's quant.json)."""
    check_params(params, cfg)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MODEL_YAML).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if hf_config_template is not None:
            (tmp / HF_TEMPLATE).write_text(json.dumps(hf_config_template, indent=2) + "\n")
        _save_params((tmp / PARAMS_DIR).absolute(), params)
        if aux_dir is not None:
            copy_aux_files(aux_dir, tmp)
    return Path(out_dir)


def load_model_config(path: str | Path, **run_options) -> ModelConfig:
    path = Path(path) / MODEL_YAML
    try:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a mapping of model config keys")
        data.update(run_options)
        return from_dict(ModelConfig, data, "model")
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_hf_template(path: str | Path) -> dict | None:
    """The ``config.json`` a checkpoint directory's weights came with, if it kept one."""
    file = Path(path) / HF_TEMPLATE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read it ({e})") from None


def load_checkpoint(path: str | Path, **run_options
                    ) -> tuple[ModelConfig, dict | None, dict[str, np.ndarray]]:
    """(config, HF config template or None, numpy params) of an mcpm checkpoint directory."""
    path = Path(path)
    if not is_mcpm_checkpoint(path):
        raise CheckpointError(f"{path} is not an mcpm checkpoint (needs {MODEL_YAML} and "
                              f"{PARAMS_DIR}/)")
    cfg = load_model_config(path, **run_options)
    template = read_hf_template(path)
    try:
        params = _checkpointer().restore((path / PARAMS_DIR).absolute())
    except Exception as e:  # orbax raises many types for damaged trees
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore parameters ({e})") from None
    params = {k: np.asarray(v) for k, v in params.items()}
    check_params(params, cfg, source=str(path / PARAMS_DIR))
    nonfinite = [(k, n, v.size) for k, v in sorted(params.items()) if (n := count_nonfinite(v))]
    if nonfinite:
        warn_nonfinite(str(path / PARAMS_DIR), nonfinite)
    return cfg, template, params
