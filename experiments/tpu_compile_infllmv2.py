"""AOT compile of the InfLLM v2 Pallas pipeline for TPU v5e and v5p, on a machine without a TPU.

Usage::

    .venv/bin/python experiments/tpu_compile_infllmv2.py                # ~15 min on 2 cores
    .venv/bin/python experiments/tpu_compile_infllmv2.py --seq 8192 --topologies v5e:1x1 \
        --no-segments                                                     # a quicker look

Writes ``experiments/results/infllmv2_tpu_compile.md`` (``--out``) and prints it.

What is compiled: libtpu's topology descriptions (``jax.experimental.topologies``) give TPU device
descriptions without a TPU; on a one-device mesh of each, ``jax.jit(f, in_shardings=...,
out_shardings=...).trace(...).lower().compile()`` runs XLA's TPU compiler and Mosaic on

* **fwd**: ``infllmv2_attention(q, k, v, SparseConfig(), implementation="pallas",
  interpret=False)``: the XLA block selection (stage 1), the index tables and the Pallas forward
  kernel;
* **fwd+bwd**: ``jax.grad`` of its float32 sum w.r.t. q, k, v: adds the inverse map and the dQ
  and dK/dV kernels;

at the MiniCPM4-8B attention layout (B = 1, 32 query heads, 2 kv heads, head_dim 128, bfloat16)
with the released sparse_config (kernel 32/16, block 64, window 2048, topk 64, init 1,
dense_len 8192; sparse at the default 32768 tokens; a ``--seq`` below 8192 uses dense_len -1 so
that the kernels are still what is compiled), and, with segment ids (packed documents), fwd+bwd
again.

Reported: compile wall time on this machine; ``compiled.memory_analysis()`` per device
(arguments, outputs, temporaries, generated code); each kernel's VMEM and SMEM, computed from its
block shapes (x2: the pipeline double-buffers every blocked operand; padded to the (8 x packing,
128) tiles) plus scratch, since the compiled HLO carries each Mosaic kernel as an opaque body
(``tpu_custom_call``) and XLA's memory analysis does not see inside it; and the HBM bytes of the
index tables. Nothing is run: there is no TPU here, so there are no timings of the kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_report  # noqa: E402

from mcpm.config import SparseConfig  # noqa: E402
from mcpm_kernels.infllmv2 import pallas_attention_bwd as bwd  # noqa: E402
from mcpm_kernels.infllmv2 import pallas_tables as tables  # noqa: E402
from mcpm_kernels.infllmv2.api import infllmv2_attention  # noqa: E402
from mcpm_kernels.infllmv2.pallas_attention import forward_plan, make_geometry  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
MIB = 2 ** 20


def sparse_config(t: int) -> SparseConfig:
    """The released sparse_config; dense_len -1 below its dense_len so the kernels still run."""
    cfg = SparseConfig()
    return cfg if t >= cfg.dense_len else SparseConfig(dense_len=-1)


def compile_pipeline(topology: str, t: int, grad: bool, segments: bool):
    """Compile fwd (or fwd+bwd) for one TPU of ``topology``: (lowered, compiled, seconds)."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = Mesh(np.array(devices[:1]), ("x",))
    rep = NamedSharding(mesh, PartitionSpec())
    shapes = [jax.ShapeDtypeStruct((1, t, HEADS, HEAD_DIM), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, t, KV_HEADS, HEAD_DIM), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)]
    if segments:
        shapes.append(jax.ShapeDtypeStruct((1, t), jnp.int32))

    cfg = sparse_config(t)

    def attention(q, k, v, seg=None):
        return infllmv2_attention(q, k, v, cfg, implementation="pallas", segment_ids=seg,
                                  interpret=False)

    if grad:
        def fn(q, k, v, *seg):
            return jax.grad(lambda q, k, v: attention(q, k, v, *seg).astype(jnp.float32).sum(),
                            (0, 1, 2))(q, k, v)
        out_shardings = (rep, rep, rep)
    else:
        fn, out_shardings = attention, rep
    start = time.perf_counter()
    lowered = jax.jit(fn, in_shardings=(rep,) * len(shapes),
                      out_shardings=out_shardings).trace(*shapes).lower()
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - start


def kernel_geometry(t: int, segments: bool):
    """The kernels' geometry for this layout, as attention_pallas builds it."""
    cfg = sparse_config(t)
    m = -(-t // cfg.block_size)
    p = min(cfg.topk, m) + cfg.window_size // cfg.block_size
    sizes = tables.BlockSizes()
    tq = sizes.tile_tokens(HEADS // KV_HEADS)
    bound = tables.union_bound(p, m, tq, cfg.block_size, topk=min(cfg.topk, m),
                               window_blocks=cfg.window_size // cfg.block_size)
    return make_geometry((1, t, HEADS, HEAD_DIM), KV_HEADS, p, cfg.block_size, sizes=sizes,
                         has_segments=segments, max_blocks_per_tile=bound), p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--topologies", nargs="+", default=["v5e:1x1", "v5p:1x1x1"])
    ap.add_argument("--no-segments", action="store_true", help="skip the segment-ids rows")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                         / "infllmv2_tpu_compile.md"))
    args = ap.parse_args()
    t = args.seq
    runs = [(topo, grad, False) for topo in args.topologies for grad in (False, True)]
    if not args.no_segments:
        runs += [(topo, True, True) for topo in args.topologies]
    rows = []
    for topo, grad, seg in runs:
        lowered, compiled, seconds = compile_pipeline(topo, t, grad, seg)
        mem = compiled.memory_analysis()
        # counted in the lowered module: compiled.as_text() of a v5p executable trips an XLA
        # RET_CHECK on async instructions (a text-dump problem, the compile itself succeeds)
        kernels = lowered.as_text().count("@tpu_custom_call")
        name = ("fwd+bwd" if grad else "fwd") + (" + segment ids" if seg else "")
        rows.append(f"| {topo} | {name} | {seconds:.0f} | "
                    f"{mem.argument_size_in_bytes / MIB:.1f} | "
                    f"{mem.output_size_in_bytes / MIB:.1f} | {mem.temp_size_in_bytes / MIB:.1f} | "
                    f"{mem.generated_code_size_in_bytes / MIB:.2f} | {kernels} |")
        print(rows[-1], flush=True)

    geo, p = kernel_geometry(t, segments=False)
    geo_seg, _ = kernel_geometry(t, segments=True)
    kernel_rows = []
    for label, g in (("", geo), (" + segment ids", geo_seg)):
        tiles, blocks = f"(B, K, nT) = (1, 2, {g.num_tiles})", f"(B, K, M) = (1, 2, {g.num_blocks})"
        for name, plan, grid in (("forward", forward_plan(g, jnp.bfloat16), tiles),
                                 ("dQ", bwd.dq_plan(g, jnp.bfloat16), tiles),
                                 ("dK/dV", bwd.dkv_plan(g, jnp.bfloat16), blocks)):
            fp = plan.footprint
            kernel_rows.append(
                f"| {name}{label} | {grid} | {fp.vmem_blocks / 1024:.0f} + "
                f"{fp.vmem_scratch / 1024:.0f} = {fp.vmem / 1024:.0f} KiB | "
                f"{fp.smem_blocks / 1024:.1f} + {fp.smem_scratch / 1024:.1f} = "
                f"{fp.smem / 1024:.1f} KiB |")
    long_geo, _ = kernel_geometry(131072, segments=True)
    table_rows = [f"| {k} | {v / MIB:.2f} | {tables.table_bytes(long_geo)[k] / MIB:.2f} |"
                  for k, v in tables.table_bytes(geo_seg).items()]
    cfg = sparse_config(t)
    tq, w = geo.tq, cfg.window_size // cfg.block_size
    u_cap = tq * cfg.topk + w + -(-tq // cfg.block_size) + 1
    md = f"""# InfLLM v2 Pallas kernels: TPU AOT compile (no TPU needed)

Made by `experiments/tpu_compile_infllmv2.py` (JAX {jax.__version__}, libtpu from the `test`
extra) on a 2-core CPU machine: libtpu's topology descriptions give TPU devices, and
`jax.jit(...).trace(...).lower().compile()` on a one-device mesh of each runs XLA's TPU compiler
and Mosaic (a mis-tiled block or an unsupported op fails here). Nothing was executed.

Layout: MiniCPM4-8B attention, B = 1, T = {t}, 32 query heads, 2 kv heads (G = 16),
head_dim 128, bfloat16. sparse_config: kernel {cfg.kernel_size}/{cfg.kernel_stride},
block {cfg.block_size}, window {cfg.window_size}, topk {cfg.topk}, init {cfg.init_blocks},
dense_len {cfg.dense_len} (the released values). The compiled function is the whole public
`infllmv2_attention(..., implementation="pallas", interpret=False)`: the stage-1 scoring
kernel and XLA's top-k (selection), index tables, the attention kernel; fwd+bwd is `jax.grad` of its float32 sum (adds the inverse map, dQ and dK/dV
kernels).

## Compiled programs (per device, from `compiled.memory_analysis()`)

| topology | program | compile s | args MiB | outputs MiB | temps MiB | code MiB | kernels |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Arguments are q, k, v ({t * 32 * 128 * 2 / MIB:.1f} + 2 x {t * 2 * 128 * 2 / MIB:.1f} MiB);
the fwd output is the attention output, the fwd+bwd outputs are dq, dk, dv. Temporaries hold the
block lists of the selection (`[1, 2, T, P = {p}]`), the index tables below, the kernels'
log-sum-exp/delta rows, the forward output kept for the backward, K/V in block layout and XLA's
sort/selection scratch; q, o, do and dq are read and written by the kernels directly in the
model's `[B, T, N, D]` layout (no transposed copies).

## Kernels (computed from block shapes and scratch; not reported by the compiler)

Query tile: tq = {geo.tq} tokens x 16 heads = {geo.rows} rows; key block {geo.block_size};
nT = {geo.num_tiles} tiles, M = {geo.num_blocks} key blocks; union bound U = {geo.union} blocks
per tile (`tq * topk + W + ceil(tq / bs) + 1`, capped at M); dK/dV pair window
{geo.pair_window} entries.
VMEM = pipelined blocks x 2 (double buffering, tile-padded) + scratch (K/V double buffers,
float32 accumulators, softmax statistics); SMEM = the step's table row x 2 + scratch. VMEM does
not depend on T; the forward/dQ SMEM row is 2 + 2U words with U <= {u_cap} at any T (topk and
window fixed), i.e. at most {2 * (2 + 2 * u_cap) * 4 / 1024:.1f} KiB. No `vmem_limit_bytes` is
set (the compiled custom calls carry empty `scoped_memory_configs`), so the default scoped-VMEM
limit applies; every kernel is far below it.

| kernel | grid | VMEM (blocks + scratch) | SMEM (blocks + scratch) |
|---|---|---:|---:|
{chr(10).join(kernel_rows)}

## Index tables (HBM, with segment ids; linear in T at fixed topk/window)

| table | MiB at T = {t} | MiB at T = 131072 |
|---|---:|---:|
{chr(10).join(table_rows)}

Only one tile's row (forward, dQ), one key block's (first pair, count) and
{geo.pair_window} pair entries (dK/dV) are in SMEM at a time, so SMEM use is the same at any T. The tables are
sized for the worst case U (every token of a tile choosing different blocks); the kernels loop
over each tile's real union size.

Notes: the kernel counts come from the lowered module (`@tpu_custom_call`), because
`compiled.as_text()` of a v5p executable fails here with an XLA RET_CHECK on async instructions
(a text-dump problem; the compile succeeds). `compiled.cost_analysis()` is not reported: the
Mosaic calls are opaque to it. Compile times are wall time on this 2-core machine.
"""
    write_report(md, args.out)


if __name__ == "__main__":
    main()
