"""Flax NNX MiniCPM4: layers, the attention seam, the decoder and its KV cache."""
from mcpm.model.minicpm4 import KVCache, LOGICAL_AXES, MiniCPM4, param_shapes

__all__ = ["KVCache", "LOGICAL_AXES", "MiniCPM4", "param_shapes"]
