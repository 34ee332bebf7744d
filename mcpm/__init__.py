"""mcpm: MiniCPM4 in JAX. Public API re-exported here."""
from mcpm.api import from_pretrained, load_params, model_from_params, params_of
from mcpm.config import Config, ConfigError, ModelConfig, SparseConfig, load_config
from mcpm.generation import generate, stream_generate
from mcpm.hf import CheckpointError
from mcpm.model import KVCache, MiniCPM4
from mcpm_kernels.infllmv2 import infllmv2_attention, infllmv2_block_mask

__all__ = ["CheckpointError", "Config", "ConfigError", "KVCache", "MiniCPM4", "ModelConfig",
           "SparseConfig", "from_pretrained", "generate", "infllmv2_attention",
           "infllmv2_block_mask", "load_config", "load_params", "model_from_params", "params_of",
           "stream_generate"]
