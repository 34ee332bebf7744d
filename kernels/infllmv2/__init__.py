"""InfLLM v2 trainable sparse attention (spec section 3).

The dense plain-JAX reference (reference.py), the gathered plain-JAX path with memory linear in
T (xla.py), the Pallas TPU kernels (pallas_scoring.py, pallas_attention.py,
pallas_attention_bwd.py, pallas_selection.py, pallas_tables.py), decode over a KV cache
(decode.py) and the public API with its ``implementation=`` switch (api.py).
"""
from mcpm_kernels.infllmv2.api import infllmv2_attention, infllmv2_block_mask
from mcpm_kernels.infllmv2.reference import attention_reference, block_mask
from mcpm_kernels.infllmv2.xla import attention_xla, select_block_lists

__all__ = ["attention_reference", "attention_xla", "block_mask", "infllmv2_attention",
           "infllmv2_block_mask", "select_block_lists"]
