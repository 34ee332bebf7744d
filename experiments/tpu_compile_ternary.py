"""AOT compile of the ternary (tq2) Pallas matmul for TPU v5e / v5p, on a machine without a TPU.

Usage::

    .venv/bin/python experiments/tpu_compile_ternary.py                       # ~1 min, 2 cores
    .venv/bin/python experiments/tpu_compile_ternary.py --topologies v5e:1x1 --m 1 8
    .venv/bin/python experiments/tpu_compile_ternary.py --decode configs/minicpm4-8b.yaml

For each topology (libtpu's topology descriptions, one-device mesh), each row count M (decode
M = 1..8, prefill M = 512 and up), each weight shape K x N (MiniCPM4-8B projections by default:
4096 x 4096, 4096 x 16384, 16384 x 4096) and each scale layout (per tensor, groups of 128),
``jax.jit(ternary_matmul_pallas).trace(...).lower().compile()`` runs XLA's TPU compiler and
Mosaic; printed: compile seconds, Mosaic calls in the program, and the per-device
``memory_analysis()`` (arguments, output, HBM temporaries). The temporaries stay at most the
padded x, never an unpacked weight (K*N bytes as int8, 2*K*N as bfloat16).

``--decode CONFIG``: instead, the whole packed model's decode step (T = 1 over a KV cache of
``--cache-len`` slots, batch ``--m``) for each topology, packed as tq2 (the model routes its
layer matmuls through the kernel when traced for TPU) and as tq1 (the XLA unpack path), per
scale layout; printed: compile seconds, Mosaic calls (one per packed matrix of the scanned
layer), arguments / output / HBM temporaries. Both compile with abstract weights: no
checkpoint is read.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcpm_kernels.ternary import ternary_matmul_pallas


def one_device(topology: str) -> NamedSharding:
    """A one-device mesh of ``topology``'s (libtpu's description of a TPU slice) first chip."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    return NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())


def decode_table(args):
    from mcpm.config import load_config
    from mcpm.model.minicpm4 import Packing
    from mcpm.quant.packed import lower_packed_decode
    from mcpm.quant.qat import HIDDEN_MATRICES
    cfg = load_config(args.decode).model
    print(f"{args.decode}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"intermediate {cfg.intermediate_size}, {cfg.compute_dtype} compute, "
          f"{args.cache_len} cache slots")
    print("| topology | B | packing | g | compile s | calls | args MiB | out MiB | temp MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for topo in args.topologies:
        rep = one_device(topo)
        for grp in args.groups:
            g = 0 if grp == "none" else int(grp)
            for fmt in ("tq2", "tq1"):
                for m in args.m:
                    t0 = time.time()
                    lowered = lower_packed_decode(cfg, Packing(fmt, HIDDEN_MATRICES, g), m,
                                                  args.cache_len, rep)
                    mem = lowered.compile().memory_analysis()
                    print(f"| {topo} | {m} | {fmt} | {grp} | {time.time() - t0:.1f} | "
                          f"{lowered.as_text().count('@tpu_custom_call')} | "
                          f"{mem.argument_size_in_bytes / 2**20:.1f} | "
                          f"{mem.output_size_in_bytes / 2**20:.1f} | "
                          f"{mem.temp_size_in_bytes / 2**20:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topologies", nargs="+", default=["v5e:1x1", "v5p:1x1x1"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 512, 2048])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x16384", "16384x4096"])
    ap.add_argument("--groups", nargs="+", default=["none", "128"])
    ap.add_argument("--decode", metavar="CONFIG",
                    help="compile the whole packed model's decode step of this model config")
    ap.add_argument("--cache-len", type=int, default=4096)
    args = ap.parse_args()
    if args.decode:
        decode_table(args)
        return
    print("| topology | M | K x N | g | compile s | calls | args MiB | out MiB | temp KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for topo in args.topologies:
        rep = one_device(topo)
        for shape in args.shapes:
            k, n = (int(v) for v in shape.split("x"))
            for grp in args.groups:
                g = None if grp == "none" else int(grp)
                for m in args.m:
                    shapes = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
                              jax.ShapeDtypeStruct((-(-k // 4), n), jnp.uint8),
                              jax.ShapeDtypeStruct((1, 1) if g is None else (k // g, n),
                                                   jnp.float32)]
                    t0 = time.time()
                    lowered = jax.jit(lambda x, p, s, k=k: ternary_matmul_pallas(x, p, s, k),
                                      in_shardings=(rep,) * 3).trace(*shapes).lower()
                    mem = lowered.compile().memory_analysis()
                    print(f"| {topo} | {m} | {k} x {n} | {grp} | {time.time() - t0:.1f} | "
                          f"{lowered.as_text().count('@tpu_custom_call')} | "
                          f"{mem.argument_size_in_bytes / 2**20:.2f} | "
                          f"{mem.output_size_in_bytes / 2**20:.2f} | "
                          f"{mem.temp_size_in_bytes / 2**10:.1f} |", flush=True)


if __name__ == "__main__":
    main()
