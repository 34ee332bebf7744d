"""Forward (prefill) and decode throughput of mcpm on this machine, against its matmul peak,
and ``mcpm.generate`` against the bare decode step.

Usage::

    .venv/bin/python experiments/bench_forward.py            # tiny + 0.5B shape (~7 min on 2 cores)
    .venv/bin/python experiments/bench_forward.py --quick    # tiny only, few repeats (smoke run)
    .venv/bin/python experiments/bench_forward.py --sizes 0.5b --no-bf16

Writes a Markdown report (default ``experiments/results/bench_forward.md``) and prints it.

What is measured (random weights; float32 params and compute unless the row label says otherwise;
for the 0.5B shape two extra settings: float32 params with bfloat16 compute, which is what
configs/minicpm4-0.5b.yaml asks for and casts each layer's weights inside every call, and
bfloat16 params with bfloat16 compute, the weights cast once beforehand):

* **Peak**: the best of several runs of a jitted ``[n, n] @ [n, n]`` float32 matmul (n = 2048 by
  default), measured in the same run; 2 n^3 FLOPs. A bfloat16 matmul is measured too, for
  reference. "% peak" columns are always relative to the *float32* peak.
* **Forward (prefill)**: ``jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))``, i.e.
  the cache-less forward that returns float32 logits ``[B, T, V]`` for every position (the
  prefill of ``mcpm.generate`` is the same network writing a KV cache and keeping only the last
  logits). tokens/s = B * T / median(wall time of one call).
* **Decode**: our own ``jax.jit`` of one cached decode step ``model(ids[B, 1], cache=cache)``
  (graphdef closed over, state and cache as arguments, the cache donated as in
  ``mcpm.generation._decode_step``; no sampling). The cache is created with ``KVCache.create`` and
  marked as already holding ``--decode-context`` tokens (segment id 1, index = context), so every
  step attends over a realistic context without paying for a prefill; the numbers computed do
  not depend on the cached values. Each timed step is one call blocked on (dispatch, compute and
  the wait); tokens/s = B / median(step time) over ``--decode-steps`` steps after warm-up.
* **Compile**: ``jitted.lower(...).compile()`` wall time. **First call**: the first execution of
  the compiled function, reported separately (on XLA:CPU it can be much slower than later
  calls); neither is included in the throughput numbers.
* **generate vs the bare step** (float32 rows, B = 1 and 8, 8-token random prompts, greedy, eos
  -1, so every call runs all its steps; cache 64 slots for everything here): the per-token time
  of ``mcpm.generate`` and of ``mcpm.stream_generate`` (default chunking) by differencing, (t(8 +
  N_long) - t(8 + N_short)) / (N_long - N_short), so the prefill and the fixed per-call work
  cancel; against the bare step, ``mcpm.generation._decode_step`` (one decode step with greedy
  sampling, the work of one iteration of generate's device loop) timed two ways: called and
  blocked on once per token (median step; its dispatch included) and dispatched back to back
  with one wait at the end (mean step; closer to the device's own time). Each repetition times
  the bare step, then generate, then stream_generate, back to back in the same process; the
  ratios are taken per repetition and the table gives their median and range. Nothing compiles
  in the timed calls (a warm-up call of each length comes first, and both lengths share one
  cache size).

FLOPs per token (stated explicitly; embedding lookups, norms, RoPE, softmax and SwiGLU
elementwise work are not counted)::

    matmul_params = L * (H*N*D + 2*H*K*D + N*D*H + 3*H*I) + H*V     # q, k, v, o, gate/up/down, head
    flops/token   = 2 * matmul_params + 4 * S * D * N * L

``H*V`` is the output projection (the tied embedding matrix is used as a matmul there, so it
counts even when tied). ``4 * S * D * N * L`` is attention (q k^T and probs @ v, 2 FLOPs per
multiply-add each) over S keys: mcpm's dense attention computes the full masked score matrix,
so S = T for the forward (the causally *useful* half would be 2 * T * D * N * L) and S = the
cache length (all slots, masked) for a decode step. These are the FLOPs the implementation
executes; MFU-style "useful" FLOPs are slightly lower for the forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

from _report import machine_info, measure_peak, write_report  # experiments/ is on sys.path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mcpm
from mcpm.config import ModelConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SIZES = {"tiny": REPO / "configs" / "tiny.yaml", "0.5b": REPO / "configs" / "minicpm4-0.5b.yaml"}


# --------------------------------------------------------------------------------------------
# machine and FLOP accounting
# --------------------------------------------------------------------------------------------

def matmul_params(cfg: ModelConfig) -> int:
    H, N, K, D, I, V, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
                           cfg.num_hidden_layers)
    return L * (H * N * D + 2 * H * K * D + N * D * H + 3 * H * I) + H * V


def flops_per_token(cfg: ModelConfig, keys: int) -> float:
    """2 * matmul params + 4 * S * D * N * L (see the module docstring)."""
    return 2.0 * matmul_params(cfg) + 4.0 * keys * cfg.head_dim * cfg.num_attention_heads \
        * cfg.num_hidden_layers


def param_bytes(cfg: ModelConfig) -> int:
    return cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------

def now() -> float:
    return time.perf_counter()


@dataclasses.dataclass
class Timing:
    compile_s: float
    first_s: float
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> str:
        return f"{min(self.times):.3g}-{max(self.times):.3g}"


def time_forward(graphdef, state, batch: int, seq: int, repeats: int, vocab: int) -> Timing:
    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab, jnp.int32)
    t0 = now()
    compiled = fwd.lower(state, ids).compile()
    compile_s = now() - t0
    t0 = now()
    out = jax.block_until_ready(compiled(state, ids))
    first_s = now() - t0
    assert out.shape == (batch, seq, vocab) and out.dtype == jnp.float32, (out.shape, out.dtype)
    assert bool(jnp.isfinite(out[:, -1]).all()), "non-finite logits"
    del out
    times = []
    for _ in range(repeats):
        t0 = now()
        jax.block_until_ready(compiled(state, ids))
        times.append(now() - t0)
    return Timing(compile_s, first_s, times)


def prefilled_cache(cfg: ModelConfig, batch: int, context: int, max_len: int) -> mcpm.KVCache:
    """A cache that claims ``context`` written slots (values zero): same work per step as a real
    one, without paying for a prefill."""
    cache = mcpm.KVCache.create(cfg, batch, max_len)
    seg = jnp.zeros((batch, max_len), jnp.int32).at[:, :context].set(1)
    return cache._replace(segment_ids=seg, index=jnp.asarray(context, jnp.int32))


def time_decode(graphdef, cfg: ModelConfig, state, batch: int, context: int, steps: int,
                warmup: int) -> tuple[Timing, int]:
    def step(st, tok, cache):
        logits, cache = nnx.merge(graphdef, st)(tok, cache=cache)
        return logits[:, -1], cache

    jstep = jax.jit(step, donate_argnums=(2,))
    max_len = -(-(context + warmup + steps + 1) // 64) * 64
    cache = prefilled_cache(cfg, batch, context, max_len)
    tok = jax.random.randint(jax.random.key(2), (batch, 1), 0, cfg.vocab_size, jnp.int32)
    t0 = now()
    compiled = jstep.lower(state, tok, cache).compile()
    compile_s = now() - t0
    t0 = now()
    logits, cache = compiled(state, tok, cache)
    jax.block_until_ready(logits)
    first_s = now() - t0
    assert logits.shape == (batch, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    for _ in range(warmup):
        logits, cache = compiled(state, tok, cache)
        jax.block_until_ready(logits)
    times = []
    for _ in range(steps):
        t0 = now()
        logits, cache = compiled(state, tok, cache)
        jax.block_until_ready(logits)
        times.append(now() - t0)
    assert int(cache.index) == context + 1 + warmup + steps
    return Timing(compile_s, first_s, times), max_len


def time_generate_vs_step(model, batch: int, n_short: int, n_long: int, repeats: int,
                          calls: int) -> dict:
    """Per-token time of ``mcpm.generate`` and ``mcpm.stream_generate`` (by differencing, each
    length the best of ``calls`` calls) against the bare ``_decode_step``, ``repeats`` times back
    to back; see the module docstring."""
    from mcpm.generation import _decode_step
    cfg = model.config
    prompt = 8
    assert prompt + n_long <= 64, "both lengths and the bare step share a 64-slot cache"
    ids = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    graphdef, state = nnx.split(model)
    greedy = (0.0, 0, 1.0)
    tok = jnp.asarray(ids[:, -1])
    positions = [jnp.full((batch,), prompt + i, jnp.int32) for i in range(n_long)]
    key = jax.random.key(0)

    def bare() -> tuple[float, float]:
        """(median of steps blocked on one by one, mean of steps dispatched back to back)."""
        cache = prefilled_cache(cfg, batch, prompt, 64)
        times = []
        for pos in positions:
            t0 = now()
            _, nxt, cache = _decode_step(graphdef, state, tok, pos, cache, key, greedy)
            jax.block_until_ready(nxt)
            times.append(now() - t0)
        cache = prefilled_cache(cfg, batch, prompt, 64)
        jax.block_until_ready(cache)
        t0 = now()
        for pos in positions:
            _, nxt, cache = _decode_step(graphdef, state, tok, pos, cache, key, greedy)
        jax.block_until_ready(nxt)
        return statistics.median(times[1:]), (now() - t0) / len(positions)

    def per_token(fn) -> float:
        def best(n):
            out = []
            for _ in range(calls):
                t0 = now()
                fn(n)
                out.append(now() - t0)
            return min(out)
        return (best(n_long) - best(n_short)) / (n_long - n_short)

    def gen(n):
        out = mcpm.generate(model, ids, max_new_tokens=n, eos_token_id=-1)
        assert out.shape == (batch, prompt + n)

    def stream(n):
        assert len(list(mcpm.stream_generate(model, ids, n, eos_token_id=-1))) == n

    t0 = now()
    for fn in (gen, stream):   # compiles prefill and the decode loop (one cache size for both)
        fn(n_long)
        fn(n_short)
    warm_s = now() - t0
    bare()
    reps = []
    for _ in range(repeats):
        step, pipelined = bare()
        reps.append((step, pipelined, per_token(gen), per_token(stream)))
    med = lambda xs: statistics.median(xs)
    ratio = lambda i, j: sorted(r[i] / r[j] for r in reps)
    out = {"warm_s": warm_s, "step_s": med(r[0] for r in reps),
           "pipelined_s": med(r[1] for r in reps), "gen_s": med(r[2] for r in reps),
           "stream_s": med(r[3] for r in reps)}
    for name, i, j in (("gen", 2, 0), ("gen_pipelined", 2, 1), ("stream", 3, 0)):
        rs = ratio(i, j)
        out[name] = f"{med(rs):.2f} ({rs[0]:.2f}-{rs[-1]:.2f})"
    return out


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny only, few repeats and steps")
    p.add_argument("--sizes", default=None,
                   help="comma-separated, from: " + ", ".join(SIZES) + " (default: all; "
                        "--quick: tiny)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the extra bfloat16 rows of the 0.5B shape")
    p.add_argument("--seq", type=int, default=512, help="forward length T (default 512)")
    p.add_argument("--decode-context", type=int, default=512,
                   help="tokens already in the cache when decode starts (default 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed forward calls per row")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per row")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak (2048)")
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_forward.md"))
    args = p.parse_args(argv)

    sizes = (args.sizes.split(",") if args.sizes else (["tiny"] if args.quick else list(SIZES)))
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    quick = args.quick
    t_start = now()

    info = machine_info()
    load_before = os.getloadavg()
    print(f"machine: {info['nproc']} cpu(s), {info['cpu']}, jax {info['jax']}; load average "
          f"{load_before[0]:.2f}", flush=True)
    peak_repeats = 5 if quick else 10
    peak_start = measure_peak(jnp.float32, args.peak_n, peak_repeats)
    peak_bf16 = measure_peak(jnp.bfloat16, args.peak_n, peak_repeats)
    print(f"peak: float32 {peak_start:.1f} GFLOP/s, bfloat16 {peak_bf16:.1f} GFLOP/s", flush=True)
    peak = peak_start  # the "% peak" columns are recomputed against the final best below

    fwd_rows, dec_rows, gen_rows = [], [], []
    for size in sizes:
        base = load_config(SIZES[size], ["model.compute_dtype=float32",
                                          "model.param_dtype=float32"]).model
        t0 = now()
        model = mcpm.MiniCPM4(base, rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(model))
        print(f"[{size}] {base.num_params() / 1e6:.1f}M params, random init "
              f"{now() - t0:.1f}s", flush=True)
        big = base.num_params() > 50e6
        repeats = args.repeats or (2 if quick else (4 if big else 10))
        steps = args.decode_steps or (8 if quick else (12 if big else 50))
        warmup = 2
        graphdef_f32, state_f32 = nnx.split(model)

        # (param dtype, compute dtype): the float32 baseline; the 0.5B yaml's own setting (float32
        # params, bfloat16 compute: weights are cast layer by layer inside every call); and
        # bfloat16 params (cast once, here) with bfloat16 compute.
        variants = [("float32", "float32")]
        if big and not args.no_bf16:
            variants += [("float32", "bfloat16"), ("bfloat16", "bfloat16")]
        for pdtype, cdtype in variants:
            cfg = dataclasses.replace(base, param_dtype=pdtype, compute_dtype=cdtype)
            if (pdtype, cdtype) == ("float32", "float32"):
                graphdef = graphdef_f32
            else:  # only the static config in the graphdef differs (and the params' dtype)
                graphdef, _ = nnx.split(nnx.eval_shape(lambda: mcpm.MiniCPM4(cfg,
                                                                             rngs=nnx.Rngs(0))))
            if pdtype != "float32":
                state = jax.tree.map(lambda x: x.astype(jnp.dtype(pdtype)), state_f32)
            else:
                state = state_f32
            label = (f"{size} ({cdtype})" if pdtype == cdtype
                     else f"{size} ({pdtype} params, {cdtype} compute)")
            prefill_batches = [1] if big else [1, 8]
            if cdtype != "float32":
                prefill_batches = [1]
            state = jax.block_until_ready(state)
            for b in prefill_batches:
                tm = time_forward(graphdef, state, b, args.seq, repeats, cfg.vocab_size)
                tps = b * args.seq / tm.median
                gflops = tps * flops_per_token(cfg, args.seq) / 1e9
                fwd_rows.append([label, f"{b} x {args.seq}", f"{tps:,.0f}",
                                 f"{tm.median * 1e3:,.1f} ({tm.spread}s, n={len(tm.times)})",
                                 f"{gflops:.1f}", f"{100 * gflops / peak:.0f}%",
                                 f"{tm.compile_s:.2f}", f"{tm.first_s:.2f}"])
                print(f"  forward {label} B={b} T={args.seq}: {tps:,.0f} tok/s, "
                      f"{gflops:.1f} GFLOP/s ({100 * gflops / peak:.0f}% of f32 peak), compile "
                      f"{tm.compile_s:.2f}s, first call {tm.first_s:.2f}s", flush=True)
            for b in (1, 8):
                tm, slots = time_decode(graphdef, cfg, state, b, args.decode_context, steps,
                                        warmup)
                tps = b / tm.median
                gflops = tps * flops_per_token(cfg, slots) / 1e9
                wbw = param_bytes(cfg) / tm.median / 1e9
                dec_rows.append([label, str(b), f"{args.decode_context} ({slots} slots)",
                                 f"{tps:,.1f}", f"{tm.median * 1e3:,.2f} ({len(tm.times)} steps)",
                                 f"{gflops:.2f}", f"{100 * gflops / peak:.1f}%", f"{wbw:.1f}",
                                 f"{tm.compile_s:.2f}", f"{tm.first_s:.2f}"])
                print(f"  decode  {label} B={b}: {tps:,.1f} tok/s ({tm.median * 1e3:.2f} ms/step"
                      f", {gflops:.2f} GFLOP/s, weights {wbw:.1f} GB/s), compile "
                      f"{tm.compile_s:.2f}s, first {tm.first_s:.2f}s", flush=True)
            if (pdtype, cdtype) == ("float32", "float32"):
                n_short, n_long = (4, 16) if big else ((8, 32) if quick else (8, 56))
                for b in (1, 8):
                    g = time_generate_vs_step(model, b, n_short, n_long,
                                              repeats=2 if quick else (3 if big else 5),
                                              calls=1 if big else 3)
                    gen_rows.append([label, str(b), f"{n_short} / {n_long}",
                                     f"{g['step_s'] * 1e3:,.2f} / {g['pipelined_s'] * 1e3:,.2f}",
                                     f"{g['gen_s'] * 1e3:,.2f}", f"**{g['gen']}**",
                                     g["gen_pipelined"], f"{g['stream_s'] * 1e3:,.2f}",
                                     g["stream"], f"{g['warm_s']:.2f}"])
                    print(f"  generate() {label} B={b}: {g['gen_s'] * 1e3:.2f} ms/token; bare "
                          f"step {g['step_s'] * 1e3:.2f} ms blocked, {g['pipelined_s'] * 1e3:.2f} "
                          f"ms pipelined; ratio {g['gen']} (to pipelined {g['gen_pipelined']}); "
                          f"stream_generate {g['stream_s'] * 1e3:.2f} ms/token, ratio "
                          f"{g['stream']}", flush=True)
            del state
        del model, state_f32
    peak_end = measure_peak(jnp.float32, args.peak_n, peak_repeats)
    load_after = os.getloadavg()
    peak = max(peak_start, peak_end)
    print(f"peak again at the end: float32 {peak_end:.1f} GFLOP/s; using the best, {peak:.1f}",
          flush=True)
    for row in fwd_rows:
        row[5] = f"{100 * float(row[4]) / peak:.0f}%"
    for row in dec_rows:
        row[6] = f"{100 * float(row[5]) / peak:.1f}%"
    total = now() - t_start
    info["load"] = (f"{load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end "
                    f"(1-minute load average; above {info['nproc']} means other processes "
                    "competed for the cores)")
    info["peaks"] = (peak_start, peak_end)

    md = render(info, peak, peak_bf16, args, fwd_rows, dec_rows, gen_rows, total, quick)
    write_report(md, args.out)
    return 0


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(info, peak, peak_bf16, args, fwd_rows, dec_rows, gen_rows, total, quick) -> str:
    parts = [
        "# mcpm forward / decode benchmark" + (" (--quick)" if quick else ""),
        "",
        f"Machine: `nproc` = {info['nproc']}, CPU: {info['cpu']}, backend {info['backend']}, "
        f"jax {info['jax']}, flax {info['flax']}, Python {info['python']}"
        + (f", XLA_FLAGS=`{info['XLA_FLAGS']}`" if info["XLA_FLAGS"] else "") + ".",
        "",
        f"System load: {info['load']}.",
        "",
        f"Matmul peak, measured in this run (jitted {args.peak_n}x{args.peak_n} @ "
        f"{args.peak_n}x{args.peak_n}, best of {5 if quick else 10}, at the start and again at "
        f"the end: {info['peaks'][0]:.1f} / {info['peaks'][1]:.1f}): **float32 {peak:.1f} "
        f"GFLOP/s** (the better of the two; bfloat16 for reference: {peak_bf16:.1f} GFLOP/s). "
        "\"% peak\" is against the float32 figure in every row.",
        "",
        "FLOPs/token = 2 x (L (H N D + 2 H K D + N D H + 3 H I) + H V) + 4 S D N L, with S = keys "
        "attended (T for the forward, all cache slots for a decode step; dense masked attention "
        "computes them all). Random weights; a label with one dtype means params and compute "
        "in that dtype. Throughput excludes compile and the first call.",
        "",
        "## Forward (prefill): jitted cache-less `model(ids)` -> float32 logits [B, T, V]",
        "",
        table(["model", "B x T", "tokens/s", "median ms/call (range, n)", "GFLOP/s", "% f32 peak",
               "compile s", "first call s"], fwd_rows),
        "",
        "## Decode: own `jax.jit` of one cached step `model(ids[B,1], cache=...)`, cache donated",
        "",
        table(["model", "B", "context (cache)", "tokens/s", "median ms/step", "GFLOP/s",
               "% f32 peak", "weight GB/s", "compile s", "first call s"], dec_rows),
        "",
        "\"weight GB/s\" = parameter bytes (in the param dtype) / step time: decode reads every "
        "weight at least once per step, so this (not FLOPs) is the roofline that matters there.",
        "",
        "## `mcpm.generate` and `mcpm.stream_generate` against the bare decode step",
        "",
        table(["model", "B", "new tokens (short / long)", "bare step ms (blocked / pipelined)",
               "generate ms/token", "generate / bare step", "generate / pipelined step",
               "stream ms/token", "stream / bare step", "warm-up s (compiles)"], gen_rows),
        "",
        "8-token prompts, greedy, 64 cache slots. ms/token = (t(long) - t(short)) / (long - "
        "short), the best of several calls per length (one for the 0.5B shape): the prefill "
        "cancels. The bare step is `mcpm.generation._decode_step` (one step with greedy "
        "sampling): *blocked* calls it and waits for it once per token (the median step, its "
        "dispatch included), *pipelined* dispatches all the steps back to back and waits once "
        "(the mean step: closer to the device's own time). Ratios are taken per repetition "
        "(bare steps, generate, stream back to back) and summarised as median (min-max). "
        "generate runs its whole decode loop in one device call; stream_generate reads back "
        "once per chunk (default chunking: about 0.1 s of decoding, at most 64 steps).",
        "",
        f"Total benchmark wall time: {total:.0f} s.",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
