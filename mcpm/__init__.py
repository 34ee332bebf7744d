"""mcpm: MiniCPM4 in JAX. Public API re-exported here."""
from mcpm._platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()

from mcpm.api import (from_pretrained, infllmv2_attention, infllmv2_block_mask,  # noqa: E402
                      load_params, model_from_params, params_of)
from mcpm.config import (Config, ConfigError, ModelConfig, SparseConfig, UserError,  # noqa: E402
                         load_config)
from mcpm.generation import generate, stream_generate  # noqa: E402
from mcpm.hf import CheckpointError  # noqa: E402
from mcpm.model import KVCache, MiniCPM4  # noqa: E402

__all__ = ["CheckpointError", "Config", "ConfigError", "KVCache", "MiniCPM4", "ModelConfig",
           "SparseConfig", "UserError", "from_pretrained", "generate", "infllmv2_attention",
           "infllmv2_block_mask", "load_config", "load_params", "model_from_params", "params_of",
           "stream_generate"]
