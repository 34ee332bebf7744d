"""Public entry points of InfLLM v2, with an ``implementation=`` switch.

"reference" is dense (O(T^2), for tests); "xla" gathers each query's blocks (memory linear in
T, the fast path on CPU); "pallas" runs the XLA block selection, then the Pallas TPU attention
kernel (forward and backward; interpreted on CPU); "auto" is "xla" for now.
"""
from __future__ import annotations

import jax

from mcpm_kernels.infllmv2.pallas_attention import attention_pallas
from mcpm_kernels.infllmv2.reference import attention_reference, block_mask
from mcpm_kernels.infllmv2.xla import attention_xla

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")


def _scoring_keys(sparse_config, scoring_keys):
    if sparse_config.use_nope and scoring_keys is None:
        raise ValueError("sparse_config.use_nope scores blocks with the pre-RoPE keys: pass them "
                         "as scoring_keys=[B, T, K, D]")
    return scoring_keys if sparse_config.use_nope else None


def infllmv2_block_mask(q_btnd: jax.Array, k_btkd: jax.Array, sparse_config, *,
                        scoring_keys: jax.Array | None = None) -> jax.Array:
    """Boolean ``[B, K, T, num_blocks]``: True = key block attended (window and init included).

    q ``[B, T, N, D]`` and k ``[B, T, K, D]`` with RoPE applied; ``sparse_config`` has the
    official keys (kernel_size, kernel_stride, init_blocks, block_size, window_size, topk,
    use_nope, dense_len; mcpm's variant and lse_approx). ``scoring_keys``: the pre-RoPE keys,
    needed with ``use_nope``.
    """
    return block_mask(q_btnd, k_btkd, sparse_config, _scoring_keys(sparse_config, scoring_keys))


def infllmv2_attention(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, sparse_config,
                       *, implementation: str = "auto",
                       segment_ids: jax.Array | None = None,
                       scoring_keys: jax.Array | None = None, interpret=None) -> jax.Array:
    """InfLLM v2 attention ``[B, T, N, D]`` (spec section 3; variant from ``sparse_config``).

    ``segment_ids [B, T]``: packed documents (0 = padding); attention never crosses them.
    ``scoring_keys [B, T, K, D]``: the pre-RoPE keys, needed with ``sparse_config.use_nope``.
    ``interpret`` (pallas only): run the kernels in the Pallas interpreter; None = when the
    default backend is the CPU; False compiles them for TPU (e.g. AOT from a CPU host).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    k_score = _scoring_keys(sparse_config, scoring_keys)
    if implementation == "pallas":
        return attention_pallas(q_btnd, k_btkd, v_btkd, sparse_config, segment_ids,
                                k_for_scoring_btkd=k_score, interpret=interpret)
    if implementation == "reference":
        return attention_reference(q_btnd, k_btkd, v_btkd, sparse_config, segment_ids, k_score)
    return attention_xla(q_btnd, k_btkd, v_btkd, sparse_config, segment_ids,
                         k_for_scoring_btkd=k_score)
