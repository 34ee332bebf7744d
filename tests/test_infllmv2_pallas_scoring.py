"""The stage-1 scoring Pallas kernel (interpret mode on CPU) against the reference composition
``block_scores(kernel_scores(...))``, the top-k selection that results, and an ahead-of-time
compile for TPU v5e / v5p at the 8B head layout (needs libtpu; no TPU)."""
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm_kernels.infllmv2.pallas_scoring import ScoringTiles, block_scores_pallas, vmem_bytes
from mcpm_kernels.infllmv2.reference import (block_scores, compress_keys, forced_scores,
                                             kernel_scores, num_kernels)


def inputs(seed, b, t_q, t_k, n, kv, d, ks, st, dtype=jnp.float32):
    """Queries ``[b, t_q, n, d]`` and the compressed keys of ``t_k`` keys, rounded to dtype."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t_q, n, d)) * 2.0, jnp.float32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, t_k, kv, d)), jnp.float32)
    return q, jax.jit(compress_keys, static_argnums=(1, 2))(k, ks, st).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))   # jit: op-by-op is slower on CPU
def reference(q, kc, ks, st, bs, m, q_start=0):
    pos = q_start + jnp.arange(q.shape[1])
    s = kernel_scores(q.astype(jnp.float32), kc.astype(jnp.float32), ks, st, positions_t=pos)
    return block_scores(s, m, bs, st)


@functools.partial(jax.jit, static_argnames=("kernel_size", "kernel_stride", "block_size",
                                              "num_blocks", "tiles"))
def pallas_scores(q, kc, q_start=0, **kw):
    return block_scores_pallas(q, kc, q_start=q_start, **kw)


CASES = {  # b, t_q, t_k, n, kv, d, kernel, stride, block, q_start, tiles
    "ragged_T_G2": (1, 103, 103, 4, 2, 16, 8, 4, 16, 0, ScoringTiles()),
    "shorter_than_block": (1, 13, 13, 4, 2, 16, 8, 4, 16, 0, ScoringTiles()),
    "batch2_G1": (2, 77, 77, 2, 2, 16, 8, 4, 16, 0, ScoringTiles()),
    "G4": (1, 150, 150, 8, 2, 32, 16, 8, 32, 0, ScoringTiles()),
    # 4 kernels, 3 + 2 extra blocks: block 2 sees only kernel 3 = 2m - 1; blocks 3, 4 none (-inf)
    "inf_blocks": (1, 90, 90, 2, 1, 16, 32, 16, 32, 0, ScoringTiles()),
    # several query and kernel tiles: carry across kernel tiles, skipped (invisible) tiles
    "small_tiles": (2, 300, 300, 4, 2, 16, 8, 4, 16, 0, ScoringTiles(queries=16, blocks=8)),
    "chunk_q_start": (1, 200, 1000, 8, 2, 16, 16, 8, 32, 517, ScoringTiles(queries=32, blocks=8)),
    "8B_layout_2k": (1, 2048, 2048, 32, 2, 128, 16, 8, 32, 0, ScoringTiles()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    b, t_q, t_k, n, kv, d, ks, st, bs, q0, tiles = CASES[name]
    q, kc = inputs(len(name), b, t_q, t_k, n, kv, d, ks, st)
    m = -(-t_k // bs) + (2 if name == "inf_blocks" else 0)
    out = pallas_scores(q, kc, q0, kernel_size=ks, kernel_stride=st, block_size=bs,
                        num_blocks=m, tiles=tiles)
    ref = reference(q, kc, ks, st, bs, m, q0)
    assert out.shape == (b, kv, t_q, m) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    if name == "inf_blocks":
        assert num_kernels(t_k, ks, st) == 4 and m == 5
        assert np.isneginf(np.asarray(out)[..., 3:]).all()
        assert np.isfinite(np.asarray(out)[..., :3]).all()
        assert (np.asarray(out)[0, 0, :79, 2] == 0).all()   # kernel 3 (keys 48..79) not yet seen
        assert (np.asarray(out)[0, 0, 79:, 2] > 0).all()


def test_shorter_than_one_kernel_all_neg_inf():
    q, kc = inputs(0, 1, 7, 7, 4, 2, 16, 8, 4)
    assert kc.shape[1] == 0
    out = block_scores_pallas(q, kc, kernel_size=8, kernel_stride=4, block_size=16, num_blocks=1)
    assert out.shape == (1, 2, 7, 1) and np.isneginf(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference(q, kc, 8, 4, 16, 1)))


def test_traced_q_start_chunks_rebuild_full_sequence():
    """Query chunks under jit with a traced q_start give the rows of the whole-sequence call."""
    ks, st, bs, t, chunk = 8, 4, 16, 256, 64
    q, kc = inputs(3, 1, t, t, 4, 2, 16, ks, st)
    m = -(-t // bs)
    f = jax.jit(lambda qc, q0: block_scores_pallas(qc, kc, kernel_size=ks, kernel_stride=st,
                                                   block_size=bs, num_blocks=m, q_start=q0))
    full = np.asarray(reference(q, kc, ks, st, bs, m))
    for q0 in range(0, t, chunk):
        out = np.asarray(f(q[:, q0:q0 + chunk], jnp.int32(q0)))
        np.testing.assert_allclose(out, full[:, :, q0:q0 + chunk], rtol=1e-5, atol=1e-6)


def test_tpu_interpret_mode_detects_no_races():
    """The TPU-faithful interpreter (pipelined block copies, scratch kept across grid steps,
    race detection) on several query and kernel tiles with a nonzero q_start."""
    from jax.experimental.pallas import tpu as pltpu
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    ks, st, bs, t_q, t_k, q0 = 16, 8, 32, 32, 400, 300
    q, kc = inputs(6, 1, t_q, t_k, 8, 2, 16, ks, st)
    m = -(-t_k // bs)
    out = block_scores_pallas(q, kc, kernel_size=ks, kernel_stride=st, block_size=bs,
                              num_blocks=m, q_start=q0, tiles=ScoringTiles(16, 8),
                              interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(q, kc, ks, st, bs, m, q0)),
                               rtol=1e-5, atol=1e-6)
    assert not interpret_pallas_call.races.races_found


def test_bfloat16_inputs():
    ks, st, bs, t = 16, 8, 32, 400
    q, kc = inputs(4, 1, t, t, 8, 2, 64, ks, st, dtype=jnp.bfloat16)
    m = -(-t // bs)
    out = pallas_scores(q, kc, kernel_size=ks, kernel_stride=st, block_size=bs, num_blocks=m)
    ref = reference(q, kc, ks, st, bs, m)          # same bf16-rounded values, in float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_topk_selection_matches():
    """Forcing + top-k as in select_block_lists picks the same blocks from both score tensors.
    Rows whose k-th and (k+1)-th scores are within 1e-5 but not equal in both tensors are left
    out as ties. Exact ties are kept (both tensors hold them at the same places and top_k
    breaks them by index): 0 (kernels not yet visible), +-inf (forced or missing), and two
    neighbouring blocks whose max is the kernel their pool windows share."""
    ks, st, bs, window, init, topk, t = 16, 8, 32, 128, 1, 6, 900
    q, kc = inputs(5, 2, t, t, 8, 2, 32, ks, st)
    m = -(-t // bs)
    pos = jnp.arange(t)
    picks = []
    for scores in (pallas_scores(q, kc, kernel_size=ks, kernel_stride=st, block_size=bs,
                                 num_blocks=m), reference(q, kc, ks, st, bs, m)):
        s, _ = forced_scores(scores, pos, bs, window, init)
        vals, idx = jax.lax.top_k(s, topk + 1)
        vals = np.asarray(vals)
        picks.append((vals[..., topk - 1], vals[..., topk],
                      np.sort(np.asarray(idx[..., :topk]), axis=-1)))
    (kth_p, next_p, idx_pallas), (kth_r, next_r, idx_ref) = picks
    exact_tie = (kth_p == next_p) & (kth_r == next_r)
    clear = exact_tie | ~np.isfinite(kth_r) | (np.abs(kth_r - next_r) > 1e-5)
    assert clear.mean() > 0.95, clear.mean()
    np.testing.assert_array_equal(idx_pallas[clear], idx_ref[clear])


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for TPU (Mosaic) without a TPU: libtpu's compiler via topologies.

def _tpu_topology(name):
    pytest.importorskip("libtpu", reason="libtpu not installed: cannot compile for TPU here")
    from jax.experimental import topologies
    # only the compiler is used (no TPU): do not wait for libtpu's one-process lockfile, which
    # another test process on this machine may hold
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


@pytest.mark.parametrize("topology,t_q", [
    ("v5e:1x1", 2048),             # one query chunk against the kernels of 32K keys
    ("v5p:1x1x1", 2048),
    ("v5e:1x1", 32768),            # all 32K queries at once
])
def test_tpu_aot_compile_8b_layout(topology, t_q):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    topo = _tpu_topology(topology)
    mesh = Mesh(np.array(topo.devices[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    t_k, n, kv, d, ks, st, bs = 32768, 32, 2, 128, 32, 16, 64
    c, m = num_kernels(t_k, ks, st), t_k // bs

    def f(q, kc, q0):
        return block_scores_pallas(q, kc, kernel_size=ks, kernel_stride=st, block_size=bs,
                                   num_blocks=m, q_start=q0, interpret=False)

    args = (jax.ShapeDtypeStruct((1, t_q, n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, c, kv, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((), jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(f, in_shardings=(rep, rep, rep)).trace(*args).lower().compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    vmem = vmem_bytes(n, kv, d, jnp.bfloat16, bs // st)
    print(f"\n{topology} T_q={t_q}: compiled in {seconds:.1f}s; {mem}; VMEM {vmem}")
    q_bytes, out_bytes = t_q * n * d * 2, kv * t_q * m * 4
    assert mem.output_size_in_bytes == out_bytes                  # [B, K, T, M] f32, nothing else
    # HBM scratch is at most the permuted kc copy: never a [T, C] tensor (that would be
    # t_q * c * 4 bytes per head, 32x the size of q here)
    assert mem.temp_size_in_bytes <= 2 * c * kv * d * 2 + (1 << 20)
    assert mem.temp_size_in_bytes < q_bytes
    assert vmem["total"] + vmem["logits [tq*G, Ck] f32 (one intermediate)"] < 16 * 2 ** 20
    assert math.isfinite(seconds)


def test_tpu_aot_compile_padded_heads_and_small_head_dim():
    """G = 8 bf16 (padded to 16 heads), D = 64, T not a multiple of the query tile: v5e."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    topo = _tpu_topology("v5e:1x1")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
    t_q, t_k, n, kv, d = 1000, 5000, 16, 2, 64
    c, m = num_kernels(t_k, 32, 16), -(-t_k // 64)

    def f(q, kc, q0):
        return block_scores_pallas(q, kc, kernel_size=32, kernel_stride=16, block_size=64,
                                   num_blocks=m, q_start=q0, interpret=False)

    args = (jax.ShapeDtypeStruct((1, t_q, n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, c, kv, d), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.int32))
    compiled = jax.jit(f, in_shardings=(rep, rep, rep)).trace(*args).lower().compile()
    out_bytes = compiled.memory_analysis().output_size_in_bytes    # TPU layout pads a little
    assert kv * t_q * m * 4 <= out_bytes < 1.1 * kv * t_q * m * 4
