"""``mcpm train``: the sharded WSD pretraining loop.

One process per host; every process runs this same function. Per step: the host's rows of the
global batch come from the data pipeline, become one global array over the mesh, and go through
the jitted, donated train step. Metrics are fetched one step late (the device never waits for
the host), logged every ``log_every`` steps (metrics.jsonl, TensorBoard, progress bar), and a
checkpoint (state, config, data-iterator states) is started every ``checkpoint_every`` steps,
at the end, and on SIGTERM, after which the run exits cleanly.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.config import Config, ConfigError, ModelConfig, save_yaml, to_dict
from mcpm.model.minicpm4 import MiniCPM4
from mcpm.sharding import (activation_rules, batch_sharding, describe, make_mesh,
                           state_shardings)
from mcpm.train.checkpoints import RunCheckpoints
from mcpm.train.metrics import MetricsWriter, plot_metrics
from mcpm.train.optimizer import make_optimizer
from mcpm.train.schedule import wsd_schedule
from mcpm.train.step import BATCH_KEYS, init_state, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters incl. the output head) plus causal
    attention's 6 x L x (N x D) x T (scores and weighted sum, forward + backward, half of T)."""
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    per_layer = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) \
        + 3 * h * cfg.intermediate_size
    matmul_params = layers * per_layer + h * cfg.vocab_size
    return 6.0 * matmul_params + 6.0 * layers * cfg.num_attention_heads * d * seq_len


def measure_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """float32 matmul FLOP/s of one local device (the MFU denominator when none is configured)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def run_layout(cfg: Config) -> tuple[Path, int, int | None, Path | None]:
    """(run directory, total steps, decay start or None, checkpoint dir to branch from)."""
    t = cfg.train
    workdir = Path(t.workdir)
    if t.decay_from >= 0:
        return (workdir / f"decay_from_{t.decay_from}", t.decay_from + t.decay_steps,
                t.decay_from, workdir)
    return workdir, t.steps, None, None


def _init_fn(model_cfg: ModelConfig, seed: int, tx):
    def init():
        params = nnx.to_pure_dict(nnx.state(MiniCPM4(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))
        return init_state(params, tx)
    return init


def train(cfg: Config, *, data=None, progress: bool = True) -> dict:
    """Run (or resume) the training run ``cfg`` describes; returns a summary dict.

    ``data``: a batch source (``next()``, ``get_state()``, ``set_state()``, ``stats()``) to use
    instead of the one ``cfg.data`` describes (tests).
    """
    from mcpm.data.pipeline import make_iterator

    t = cfg.train
    run_dir, total, decay_start, branch_from = run_layout(cfg)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    model_cfg = cfg.model
    global_batch, seq_len = cfg.data.batch_size, cfg.data.seq_len

    abstract_params = jax.eval_shape(
        lambda: nnx.to_pure_dict(nnx.state(MiniCPM4(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    tx = make_optimizer(abstract_params, model_cfg, t.optimizer, t.schedule, total, decay_start)
    schedule = wsd_schedule(t.schedule, total, decay_start)
    state_shapes = jax.eval_shape(_init_fn(model_cfg, cfg.seed, tx))
    st_sh = state_shardings(state_shapes, model_cfg, mesh, rules)
    b_sh = batch_sharding(mesh, rules, global_batch)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, st_sh)

    ckpts = RunCheckpoints(run_dir, t.keep_last, t.keep_every)
    restored = ckpts.restore(abstract_state)
    data_state, note = None, "fresh start"
    if restored is not None:
        start, state, _, data_state = restored
        note = f"resumed from step {start}"
    elif branch_from is not None:
        source = RunCheckpoints(branch_from, t.keep_last, t.keep_every)
        start, state, source_cfg, data_state = source.restore(abstract_state, step=t.decay_from)
        source.close()
        if source_cfg.get("data") != to_dict(cfg.data):
            data_state = None  # the decay switches the data mixture: a fresh pipeline
        note = f"branch decay from step {start} of {branch_from}"
    else:
        start = 0
        state = jax.jit(_init_fn(model_cfg, cfg.seed, tx), out_shardings=st_sh)()
    if start >= total:
        ckpts.close()
        return {"run_dir": str(run_dir), "step": start, "note": f"already at step {start}",
                "preempted": False}

    source = data if data is not None else make_iterator(
        cfg.data, process_index=jax.process_index(), process_count=jax.process_count())
    if data_state is not None:
        source.set_state(data_state)
    vocab = getattr(source, "vocab_size", None)
    if vocab is not None and vocab > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer {getattr(source, 'tokenizer_path', '')} has {vocab} "
                          f"pieces but model.vocab_size is {model_cfg.vocab_size}: raise "
                          "model.vocab_size or use a smaller tokenizer (data.tokenizer)")

    step_fn = jax.jit(
        make_train_step(model_cfg, tx, schedule, z_loss=t.z_loss, accum_steps=t.accum_steps,
                        activation_rules=lambda: activation_rules(mesh, rules)),
        in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)

    peak = t.peak_flops_per_device or measure_peak_flops()
    flops_per_token = model_flops_per_token(model_cfg, seq_len)
    writer = MetricsWriter(run_dir, enabled=is_main)
    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    if is_main:
        print(f"mcpm train: {note}; {model_cfg.num_params() / 1e6:.1f}M parameters, mesh "
              f"{describe(mesh)}, batch {global_batch} x {seq_len}, steps {start} -> {total}",
              flush=True)

    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        ckpts.save(step, state, to_dict(cfg), data_state=source.get_state())

    pending = None           # (step, metrics) of the step before, fetched one step late
    in_a_row, last_log, last_log_step = 0, time.perf_counter(), start
    last_loss = None
    interval_losses = []     # finite losses since the last log line: their mean is loss_avg
    step = start
    preempted = False
    try:
        while step < total:
            local = next(source)
            batch = {k: jax.make_array_from_process_local_data(b_sh, np.asarray(local[k]))
                     for k in BATCH_KEYS}
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                in_a_row, last_loss = _check(pending, in_a_row, t.max_nonfinite_in_a_row)
                interval_losses += [] if last_loss is None else [last_loss]
            pending = (step, metrics)
            if step % t.log_every == 0 or step == total:
                in_a_row, last_loss = _check(pending, in_a_row, t.max_nonfinite_in_a_row)
                interval_losses += [] if last_loss is None else [last_loss]
                pending = None
                now = time.perf_counter()
                tokens = (step - last_log_step) * global_batch * seq_len
                tok_s = tokens / max(now - last_log, 1e-9)
                row = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
                # one batch's loss is noisy on a mixed corpus; the interval mean is the curve
                row.update(loss_avg=(float(np.mean(interval_losses)) if interval_losses
                                     else float("nan")),
                           tokens_per_s=tok_s,
                           mfu=tok_s * flops_per_token / (peak * jax.device_count()),
                           **{f"data_{k}": v for k, v in source.stats().items()})
                writer.write(step, row)
                last_log, last_log_step, interval_losses = now, step, []
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss_avg']:.3f}", lr=f"{row['lr']:.2e}",
                                    tok_s=f"{tok_s:.0f}")
            if bar is not None:
                bar.update(1)
            if stop["signal"] is not None:
                save(step)
                preempted = True
                break
            if step % t.checkpoint_every == 0 or step == total:
                save(step)
        if pending is not None:
            in_a_row, last_loss = _check(pending, in_a_row, t.max_nonfinite_in_a_row)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.close()
        ckpts.close()
        writer.close()
    model_dir = None
    if not preempted and jax.process_count() == 1:
        # the trained model as an mcpm checkpoint (tokenizer included): mcpm generate, convert
        from mcpm.checkpoint import save_checkpoint
        tok = getattr(source, "tokenizer_path", None)
        model_dir = str(save_checkpoint(
            run_dir / "model", model_cfg, jax.device_get(state["params"]),
            aux_dir=Path(tok).parent if tok else None, overwrite=True))
    plot = None
    if is_main and (run_dir / "metrics.jsonl").exists():
        plot = str(plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png",
                                f"{run_dir.name}: {model_cfg.num_params() / 1e6:.1f}M parameters"))
    summary = {"run_dir": str(run_dir), "step": step, "loss": last_loss, "preempted": preempted,
               "note": note, "plot": plot, "checkpoints": ckpts.steps(), "model": model_dir}
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _check(pending, in_a_row: int, limit: int) -> tuple[int, float | None]:
    """Count non-finite steps in a row; stop the run when there are ``limit`` of them."""
    step, metrics = pending
    finite = bool(jax.device_get(metrics["finite"]))
    loss = float(jax.device_get(metrics["loss"]))
    in_a_row = 0 if finite else in_a_row + 1
    if in_a_row >= limit:
        raise TrainingError(
            f"{in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
            f"(their updates were skipped); stopping. Lower train.schedule.peak_lr, check the "
            f"data, or raise train.max_nonfinite_in_a_row (now {limit}). The last checkpoint "
            "holds the state before them.")
    return in_a_row, loss if finite else None


def with_train(cfg: Config, **fields) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))
