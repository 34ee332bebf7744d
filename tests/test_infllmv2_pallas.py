"""The Pallas InfLLM v2 kernels in interpret mode (CPU) against the dense reference: forward and
gradients at awkward lengths, packed/padded batches, the 8B head layout, bfloat16, duplicate block
lists, the index tables, the public API, and the TPU interpreter's race detector."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

import mcpm
from mcpm.config import SparseConfig
from mcpm_kernels.infllmv2 import pallas_attention_bwd as bwd
from mcpm_kernels.infllmv2 import pallas_tables as tables
from mcpm_kernels.infllmv2.pallas_attention import (attention_pallas, block_sparse_attention,
                                                    default_interpret, forward_plan,
                                                    make_geometry)
from mcpm_kernels.infllmv2.reference import attention_reference
from mcpm_kernels.infllmv2.xla import select_block_lists
from attention_inputs import attention_atol
from test_infllmv2_xla import SMALL, packed_segments, qkv


def outputs_and_grads(fn, q, k, v, ct):
    """One jit: fn's output and the gradients of ``sum(fn * ct)`` w.r.t. q, k, v."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return (out.astype(jnp.float32) * ct).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def cotangent(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def assert_matches_reference(q, k, v, cfg, seg, fn=None, grad_atol_scale=None):
    """Forward (rtol 1e-5, atol from the scores' rounding: ``attention_atol``) and gradients
    (1e-4, 1e-5); ``grad_atol_scale``: gradient atol = that x the reference gradient's largest
    magnitude."""
    fn = fn or (lambda q, k, v: attention_pallas(q, k, v, cfg, seg, interpret=True))
    ct = cotangent(q.shape)
    out, grads = outputs_and_grads(fn, q, k, v, ct)
    ref, ref_grads = outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, cfg, seg), q, k, v, ct)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=attention_atol(q, k, v))
    for g, g_ref in zip(grads, ref_grads):
        atol = 1e-5 if grad_atol_scale is None else grad_atol_scale * np.abs(g_ref).max()
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=atol)


def test_packed_batch_through_the_public_api():
    """Batch of 2 rows of packed documents with padding, T = 70 (not a multiple of the 8-token
    block nor of the 32-token query tile), T at dense_len (sparse), through
    ``mcpm.infllmv2_attention(implementation="pallas")``, interpreted because this is a CPU."""
    assert default_interpret()
    cfg = dataclasses.replace(SMALL, dense_len=70)
    q, k, v = qkv(170, 2, 70, 4, 2, 8)
    seg = packed_segments(2, 70, 70)
    assert_matches_reference(q, k, v, cfg, seg, lambda q, k, v: mcpm.infllmv2_attention(
        q, k, v, cfg, implementation="pallas", segment_ids=seg))


def test_shorter_than_one_block_three_heads_per_group():
    """T = 5 < one block and one kernel; G = 3 (96-row tiles); no segment ids."""
    q, k, v = qkv(105, 2, 5, 6, 2, 8)
    assert_matches_reference(q, k, v, SMALL, None)


def test_below_dense_len_is_dense():
    cfg = dataclasses.replace(SMALL, dense_len=70, topk=1)
    q, k, v = qkv(169, 1, 69, 4, 2, 8)
    dense = dataclasses.replace(cfg, dense_len=-1, topk=100)       # every visible block chosen
    out, ref = jax.jit(lambda q, k, v: (attention_pallas(q, k, v, cfg, interpret=True),
                                        attention_reference(q, k, v, dense)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-6)


def test_8b_head_layout():
    """32 query heads on 2 kv heads (G = 16: 8-token, 128-row tiles), d = 128, with the sparse
    sizes scaled down with T so that selection is really sparse (32 blocks, at most 8 per query:
    4 chosen + a 4-block window). 512 tokens keep it at ~15 s on 2 cores (2048: ~100 s)."""
    cfg = SparseConfig(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16,
                       window_size=64, topk=4, use_nope=False, dense_len=-1)
    q, k, v = qkv(7, 1, 512, 32, 2, 128)
    # dK/dV sum up to 32 tiles x 16 heads in another order than the reference: atol relative
    # to the gradient's scale
    assert_matches_reference(q, k, v, cfg, None, grad_atol_scale=1e-5)


def test_bfloat16_close_to_float32_reference():
    q, k, v = qkv(3, 2, 48, 4, 2, 16)
    seg = packed_segments(2, 48, 3)
    ct = cotangent(q.shape)
    out, grads = outputs_and_grads(
        lambda q, k, v: attention_pallas(q, k, v, SMALL, seg, interpret=True),
        *(x.astype(jnp.bfloat16) for x in (q, k, v)), ct)
    ref, ref_grads = outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, SMALL, seg), q, k, v, ct)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(out, ref) < 2e-2
    for g, g_ref in zip(grads, ref_grads):
        assert rel(g, g_ref) < 3e-2


def dense_from_lists(q, k, v, idx, valid, block_size, seg=None):
    """Dense masked attention where query i sees keys t <= i of the blocks listed valid for it."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    key_block = jnp.arange(t) // block_size
    listed = ((idx[..., None] == key_block) & valid[..., None]).any(axis=-2)   # [B, K, T, S]
    allowed = listed & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])
    if seg is not None:
        allowed &= (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] != 0)
    logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, n // kv, d), k) / np.sqrt(d)
    mask = allowed[:, :, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)


def test_duplicate_and_out_of_range_slots_count_once():
    """Arbitrary lists (default union bound): a block listed twice is attended once, invalid and
    out-of-range slots are ignored, and a query whose list hides every key gets 0."""
    b, t, n, kv, d, bs, p = 2, 45, 4, 2, 8, 8, 5
    q, k, v = qkv(11, b, t, n, kv, d)
    rng = np.random.default_rng(5)
    m = -(-t // bs)
    idx = rng.integers(-1, m + 2, size=(b, kv, t, p)).astype(np.int32)
    idx[..., 1] = idx[..., 0]                                   # duplicates
    valid = rng.random((b, kv, t, p)) < 0.8
    valid[:, :, 3] = False                                      # query 3 attends nothing
    idx, valid = jnp.asarray(idx), jnp.asarray(valid)
    seg = packed_segments(b, t, 4)
    ct = cotangent(q.shape)
    out, grads = outputs_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, idx, valid, seg, block_size=bs, interpret=True), q, k, v, ct)
    in_range = valid & (idx >= 0) & (idx < m)
    ref, ref_grads = outputs_and_grads(
        lambda q, k, v: dense_from_lists(q, k, v, idx, in_range, bs, seg), q, k, v, ct)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    assert not np.isnan(out).any() and np.all(out[:, 3] == 0)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_tables_union_bits_and_inverse_map():
    b, t, kv, p, bs = 1, 40, 2, 6, 4
    rng = np.random.default_rng(0)
    m = t // bs
    idx = rng.integers(0, m, size=(b, kv, t, p)).astype(np.int32)
    valid = rng.random((b, kv, t, p)) < 0.7
    geo = make_geometry((b, t, 2 * kv, 8), kv, p, bs, sizes=tables.BlockSizes(pair_window=8))
    rows = np.asarray(jax.jit(tables.tile_rows, static_argnums=2)(
        jnp.asarray(idx), jnp.asarray(valid), geo))[:, :, :, 0]
    u, tq = geo.union, geo.tq
    pairs = set()
    for h in range(kv):
        for tile in range(geo.num_tiles):
            toks = range(tile * tq, min(t, tile * tq + tq))
            want = {}
            for i in toks:
                for blk in set(idx[0, h, i][valid[0, h, i]]):
                    want[blk] = want.get(blk, 0) | (1 << (i - tile * tq))
            row = rows[0, h, tile]
            count = row[0]
            got = dict(zip(row[2:2 + count], row[2 + u:2 + u + count].view(np.uint32)))
            assert list(row[2:2 + count]) == sorted(want) and got == want
            if tile + 1 < geo.num_tiles:
                assert row[1] == rows[0, h, tile + 1, 2]
            pairs |= {(h, int(blk), tile, bits) for blk, bits in want.items()}
    csr, pair_tile, pair_bits = (np.asarray(x) for x in jax.jit(
        tables.inverse_tables, static_argnums=1)(jnp.asarray(rows[:, :, :, None]), geo))
    got = set()
    for h in range(kv):
        flat_t, flat_b = pair_tile[0, h].reshape(-1), pair_bits[0, h].reshape(-1).view(np.uint32)
        for blk in range(m):
            start, count = csr[0, h, blk, 0]
            assert list(flat_t[start:start + count]) == sorted(flat_t[start:start + count])
            got |= {(h, blk, int(flat_t[i]), int(flat_b[i]))
                    for i in range(start, start + count)}
    assert got == pairs


def test_no_race_detected():
    """Each kernel (forward, dQ, dK/dV) under the TPU interpreter with its race detector, on a
    shape with 3 query tiles (one partial), a pair list longer than one SMEM window, segments."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    params = pltpu.InterpretParams(detect_races=True)
    b, t, n, kv, d = 1, 20, 2, 1, 8
    cfg = dataclasses.replace(SMALL, block_size=4, window_size=8, kernel_size=4, kernel_stride=2)
    q, k, v = qkv(9, b, t, n, kv, d)
    seg = packed_segments(b, t, 9)
    p = cfg.topk + cfg.window_size // cfg.block_size
    geo = make_geometry(q.shape, kv, p, cfg.block_size, has_segments=True,
                        sizes=tables.BlockSizes(query_rows=16, pair_window=8), interpret=params)
    assert geo.tq == 8 and geo.num_tiles == 3

    @jax.jit
    def inputs(q, k, v, seg, ct):
        idx, valid = select_block_lists(q, k, cfg)
        rows = tables.tile_rows(idx, valid, geo)
        return (rows, tables.queries_to_tiles(q, geo), tables.keys_to_blocks(k, geo),
                tables.keys_to_blocks(v, geo), tables.segment_rows(seg, geo),
                tables.segment_blocks(seg, geo), tables.queries_to_tiles(ct, geo),
                tables.inverse_tables(rows, geo))

    rows, q_t, k_b, v_b, qseg, kseg, do, (csr, pair_tile, pair_bits) = inputs(
        q, k, v, seg, cotangent(q.shape))
    assert int(csr[:, :, :, 0, 1].sum(-1).max()) > geo.pair_window   # several SMEM windows

    def run(fn, *args):
        out = jax.block_until_ready(jax.jit(fn)(*args))
        assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
        return out

    o, lse = run(forward_plan(geo, q.dtype).call, rows, q_t, qseg, k_b, v_b, kseg)
    np.testing.assert_allclose(np.asarray(tables.tiles_to_queries(o, geo)),
                               np.asarray(attention_reference(q, k, v, cfg, seg)),
                               rtol=1e-5, atol=2e-6)
    delta = tables.per_row(jnp.sum(o * do, axis=-1), geo)
    run(bwd.dq_plan(geo, q.dtype).call, rows, q_t, do, lse, delta, qseg, k_b, v_b, kseg)
    run(bwd.dkv_plan(geo, k.dtype).call, csr, k_b, v_b, kseg, pair_tile, pair_bits, q_t, do, lse,
        delta, qseg)


def test_race_detector_flags_a_read_before_the_dma_wait():
    """The check above is not vacuous: reading a DMA's destination before waiting is a race."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from jax.experimental import pallas as pl

    def racy(x_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
        copy.start()
        o_ref[...] = buf[...]          # before copy.wait()
        copy.wait()

    call = pl.pallas_call(
        racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), pltpu.SemaphoreType.DMA((1,))],
        interpret=pltpu.InterpretParams(detect_races=True))
    jax.block_until_ready(call(jnp.ones((8, 128), jnp.float32)))
    assert tpu_interpret.races is not None and tpu_interpret.races.races_found
