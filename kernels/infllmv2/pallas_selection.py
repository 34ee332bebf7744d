"""InfLLM v2 block selection with stage 1 on the Pallas scoring kernel: per-query block lists
``(idx, valid) [B, K, T, P]`` exactly as :func:`mcpm_kernels.infllmv2.xla.select_block_lists`
gives them, with the kernel relevance and block max-pool computed by
:func:`~mcpm_kernels.infllmv2.pallas_scoring.block_scores_pallas` over query chunks (so at most
one chunk's ``[B, K, chunk, M]`` block scores exist at a time) and the forcing and top-k of the
reference (:func:`~mcpm_kernels.infllmv2.reference.select_block_lists_from_scores`).

The LSE approximation is not in the kernel: with ``lse_approx`` the XLA scoring is used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mcpm_kernels.infllmv2.pallas_scoring import block_scores_pallas
from mcpm_kernels.infllmv2.reference import scoring_inputs, select_block_lists_from_scores
from mcpm_kernels.infllmv2.xla import _pad_to, select_block_lists


def select_block_lists_pallas(q_btnd: jax.Array, k_btkd: jax.Array, cfg, *, chunk: int = 2048,
                              k_for_scoring_btkd: jax.Array | None = None, interpret=None
                              ) -> tuple[jax.Array, jax.Array]:
    if cfg.lse_approx:
        return select_block_lists(q_btnd, k_btkd, cfg, k_for_scoring_btkd=k_for_scoring_btkd)
    b, t, n, d = q_btnd.shape
    bs = cfg.block_size
    m = -(-t // bs)
    q, kc_bckd, _ = scoring_inputs(q_btnd, k_btkd, cfg, k_for_scoring_btkd)
    # scoring precision follows the queries: float32 queries score exactly like the reference
    kc_bckd = kc_bckd.astype(jnp.promote_types(q.dtype, jnp.bfloat16)
                             if q.dtype != jnp.float32 else jnp.float32)
    chunk = min(chunk, -(-t // 8) * 8)
    q_chunks = _pad_to(q, chunk).reshape(b, -1, chunk, n, d).transpose(1, 0, 2, 3, 4)

    def one_chunk(args):
        q_bqnd, start = args
        scores = block_scores_pallas(q_bqnd, kc_bckd, kernel_size=cfg.kernel_size,
                                     kernel_stride=cfg.kernel_stride, block_size=bs,
                                     num_blocks=m, q_start=start, interpret=interpret)
        return select_block_lists_from_scores(scores, start + jnp.arange(chunk), cfg)

    starts = jnp.arange(q_chunks.shape[0], dtype=jnp.int32) * chunk
    idx, valid = jax.lax.map(one_chunk, (q_chunks, starts))           # [nc, B, K, chunk, P]
    p = idx.shape[-1]
    nc = q_chunks.shape[0]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, -1, nc * chunk, p)[:, :, :t]
    valid = valid.transpose(1, 2, 0, 3, 4).reshape(b, -1, nc * chunk, p)[:, :, :t]
    return idx, valid
