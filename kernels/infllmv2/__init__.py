"""InfLLM v2 trainable sparse attention (spec section 3).

Done: the dense plain-JAX reference and the public API. To come (issue 3): the gathered
plain-JAX path (memory linear in T), Pallas TPU kernels (stage-1 scoring, forward, backward),
model integration and decode.
"""
from mcpm_kernels.infllmv2.api import infllmv2_attention, infllmv2_block_mask
from mcpm_kernels.infllmv2.reference import attention_reference, block_mask

__all__ = ["attention_reference", "block_mask", "infllmv2_attention", "infllmv2_block_mask"]
