"""InfLLM v2 trainable sparse attention (spec section 3).

Done: the dense plain-JAX reference (reference.py), the gathered plain-JAX path with memory
linear in T (xla.py) and the public API (api.py). To come (issue 3): Pallas TPU kernels
(stage-1 scoring, forward, backward), model integration, decode and benchmarks.
"""
from mcpm_kernels.infllmv2.api import infllmv2_attention, infllmv2_block_mask
from mcpm_kernels.infllmv2.reference import attention_reference, block_mask
from mcpm_kernels.infllmv2.xla import attention_xla, select_block_lists

__all__ = ["attention_reference", "attention_xla", "block_mask", "infllmv2_attention",
           "infllmv2_block_mask", "select_block_lists"]
