"""Block selection with stage 1 on the Pallas scoring kernel (interpreted) gives the XLA
selection's block lists, both variants, over several query chunks."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.config import SparseConfig
from mcpm_kernels.infllmv2.pallas_selection import select_block_lists_pallas
from mcpm_kernels.infllmv2.xla import select_block_lists

CFG = SparseConfig(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=32,
                   window_size=128, topk=8, dense_len=-1)


@pytest.mark.parametrize("t,n,kv,d,variant", [(300, 4, 2, 16, "A"), (517, 8, 2, 32, "B"),
                                              (40, 2, 1, 8, "A")])
def test_same_block_lists_as_the_xla_selection(t, n, kv, d, variant):
    rng = np.random.default_rng(t)
    cfg = dataclasses.replace(CFG, variant=variant)
    q = jnp.asarray(rng.standard_normal((2, t, n, d)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, kv, d)), jnp.float32)
    idx_x, ok_x = (np.asarray(a) for a in select_block_lists(q, k, cfg))
    idx_p, ok_p = (np.asarray(a) for a in select_block_lists_pallas(q, k, cfg, chunk=128,
                                                                     interpret=True))
    np.testing.assert_array_equal(ok_p, ok_x)
    np.testing.assert_array_equal(np.where(ok_p, idx_p, -1), np.where(ok_x, idx_x, -1))
    assert ok_x.sum() < ok_x.size  # some slots are unused: the test is about a real selection
