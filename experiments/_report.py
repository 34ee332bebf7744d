"""Shared by the benchmark scripts: the machine's facts, its measured matmul peak, synthetic
train batches, and the Markdown report (printed and saved)."""
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def write_report(markdown: str, out: str | Path) -> None:
    print()
    print(markdown)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    print(f"wrote {out}")


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(os.cpu_count())
    try:
        import flax
        flax_version = flax.__version__
    except AttributeError:
        flax_version = "?"
    return {"nproc": nproc, "cpu": cpu, "jax": jax.__version__, "flax": flax_version,
            "backend": f"{jax.default_backend()} ({len(jax.devices())} device(s))",
            "python": platform.python_version(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def measure_peak(dtype, n: int, repeats: int) -> float:
    """Best GFLOP/s of a jitted [n,n] @ [n,n] matmul (compile and first call excluded)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def synthetic_batch(vocab: int, batch: int, seq: int, documents: int | None = 1) -> dict:
    """A train step's host batch of random tokens: ``documents`` packed documents a row (as the
    packing pipeline makes them), or ``None`` for no ``segment_ids`` at all (one document a row,
    which lets cuDNN attention take it)."""
    ids = np.random.default_rng(0).integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    out = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "weights": np.ones((batch, seq), np.float32)}
    cuts = [seq * i // (documents or 1) for i in range((documents or 1) + 1)]
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for d, (a, b) in enumerate(zip(cuts, cuts[1:])):
        seg[:, a:b], pos[:, a:b] = d + 1, np.arange(b - a)
    out["positions"] = pos
    if documents is not None:
        out["segment_ids"] = seg
    return out
