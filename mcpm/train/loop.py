"""``mcpm train``: the sharded WSD pretraining loop.

One process per host; every process runs this same function. Per step: the host's rows of the
global batch come from the data pipeline, become one global array over the mesh, and go through
the jitted, donated train step. Metrics are fetched one step late (the device never waits for
the host), logged every ``log_every`` steps (metrics.jsonl, TensorBoard, progress bar), and a
checkpoint (state, config, data-iterator states) is started every ``checkpoint_every`` steps,
at the end, and on SIGTERM or Ctrl-C, after which the run stops cleanly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcpm.config import Config, ConfigError, ModelConfig, save_yaml, to_dict
from mcpm.sharding import describe
from mcpm.train.checkpoints import RunCheckpoints
from mcpm.train.metrics import MetricsWriter, plot_metrics
from mcpm.train.program import build_train_program, schedule_span
from mcpm.train.resume import (CONFIG_FILE, ResumeError, check_same_run, holds_files,
                               move_aside, saved_run_config, schedule_change)
from mcpm.train.step import BATCH_KEYS


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
    workdir = Path(cfg.train.workdir)
    total, decay_start = schedule_span(cfg)
    if decay_start is not None:
        return workdir / f"decay_from_{decay_start}", total, decay_start, workdir
    return workdir, total, None, None


class _Interrupts:
    """SIGTERM and Ctrl-C (SIGINT) ask the loop to save a checkpoint after the current step and
    stop; a second Ctrl-C exits at once (the last complete checkpoint stays the resume point)."""

    def __init__(self, announce: bool):
        self.signal = None
        self.announce = announce
        self._previous = {}

    def _handle(self, sig, frame):
        if sig == signal.SIGINT and self.signal is not None:
            print("\nmcpm train: second Ctrl-C: exiting now; the run resumes from its last "
                  "complete checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal = sig
        if sig == signal.SIGINT and self.announce:
            print("\nmcpm train: Ctrl-C: saving a checkpoint after this step (press Ctrl-C "
                  "again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # e.g. SIGINT in a background job: whoever ignored it meant it
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class HeldOut:
    """The held-out batches ``eval_loss`` is measured on: the first ``train.eval_batches``
    batches of ``data.eval_sources`` read in order (unshuffled), made once and reused, so every
    evaluation of a run and its branches sees the same tokens."""

    def __init__(self, cfg: Config, program, batches: list | None = None):
        from mcpm.data.pipeline import make_iterator

        self.program, self.batches = program, list(batches or [])
        sources = cfg.data.eval_source_list()
        if batches is not None or not sources or cfg.train.eval_batches == 0:
            return
        data = dataclasses.replace(cfg.data, sources=sources, eval_sources=(), shuffle=False,
                                   prefetch=0, workers=0)
        it = make_iterator(data, process_index=jax.process_index(),
                           process_count=jax.process_count())
        try:
            self.batches = [next(it) for _ in range(cfg.train.eval_batches)]
        finally:
            it.close()

    def __bool__(self) -> bool:
        return bool(self.batches)

    def loss(self, params) -> tuple[float, int]:
        """(mean next-token loss over the held-out tokens, their number)."""
        nll = tokens = 0.0
        for local in self.batches:
            batch = {k: jax.make_array_from_process_local_data(
                self.program.batch_sharding, np.asarray(local[k])) for k in BATCH_KEYS}
            sums = self.program.eval_step(params, batch)
            nll, tokens = nll + sums["nll"], tokens + sums["tokens"]
        nll, tokens = float(jax.device_get(nll)), float(jax.device_get(tokens))
        return nll / max(tokens, 1.0), int(tokens)


def _say(is_main: bool, text: str) -> None:
    if is_main:
        print(f"mcpm train: {text}", flush=True)


def train(cfg: Config, *, data=None, eval_data=None, progress: bool = True, reinit: bool = False,
          restart_data: bool = False, confirm_schedule_change: bool = False) -> dict:
    """Run (or resume) the training run ``cfg`` describes; returns a summary dict.

    Resuming is a contract (:mod:`mcpm.train.resume`): a workdir whose saved config differs in
    a key that may not change refuses with ResumeError, and so does a checkpoint without its
    data-iterator state (unless ``restart_data``) or a changed ``steps`` that makes the
    learning rate jump at the resume step (unless ``confirm_schedule_change``). ``reinit``
    moves an existing run directory aside and starts afresh. Every check runs before anything
    is written, so a refused command leaves the filesystem as it found it.

    ``data``: a batch source (``next()``, ``get_state()``, ``set_state()``, ``stats()``) to use
    instead of the one ``cfg.data`` describes (tests), and ``eval_data`` a list of local batches
    to measure ``eval_loss`` on with it (none: no evaluation).
    """
    from mcpm.data.pipeline import OldStateError, make_iterator

    t = cfg.train
    run_dir, total, decay_start, branch_from = run_layout(cfg)
    is_main = jax.process_index() == 0
    model_cfg = cfg.model
    global_batch, seq_len = cfg.data.batch_size, cfg.data.seq_len

    # Steps 1-3 only read (the workdirs' checkpoint managers are opened without creating
    # anything); nothing is written until every check has passed.
    with contextlib.ExitStack() as readers:
        existing = readers.enter_context(contextlib.closing(
            RunCheckpoints(run_dir, t.keep_last, t.keep_every, create=False)))

        # 1. Is this the same run?
        saved = None if reinit else saved_run_config(run_dir, existing)
        if saved is None and not reinit and holds_files(run_dir):
            raise ResumeError(
                f"{run_dir} holds files but no mcpm run (no {CONFIG_FILE}, no readable "
                f"checkpoint): a run there would write over them (model/, metrics.jsonl). Give "
                "a new or empty workdir, or pass --reinit to move this directory aside")
        changes = [] if saved is None else check_same_run(saved, cfg, run_dir)
        source_ckpts, branch_new_data = None, False
        if branch_from is not None and (saved is None or not existing.steps()):
            source_ckpts = readers.enter_context(contextlib.closing(
                RunCheckpoints(branch_from, t.keep_last, t.keep_every, create=False)))
            if decay_start not in source_ckpts.steps():
                raise ResumeError(
                    f"decay_from={decay_start}: {branch_from} has no checkpoint at step "
                    f"{decay_start} (it has: {source_ckpts.steps() or 'none'}); branch from "
                    "one of those steps")
            main_saved = saved_run_config(branch_from, source_ckpts)
            if main_saved is not None:
                check_same_run(main_saved, cfg, run_dir, branch_of=branch_from)
                branch_new_data = main_saved["data"] != to_dict(cfg.data)

        # 2. The program (the mesh may not fit the devices), the data (sources may be unusable)
        program = build_train_program(cfg)
        source = data if data is not None else make_iterator(
            cfg.data, process_index=jax.process_index(), process_count=jax.process_count())
        held_out = HeldOut(cfg, program, None if data is None else (eval_data or []))
        vocab = getattr(source, "vocab_size", None)
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer {getattr(source, 'tokenizer_path', '')} has "
                              f"{vocab} pieces but model.vocab_size is {model_cfg.vocab_size}: "
                              "raise model.vocab_size or use a smaller tokenizer "
                              "(data.tokenizer)")

        # 3. Restore: this run's latest checkpoint, or the branch's fork point
        restored = None if reinit else existing.restore(
            program.abstract_state, allow_missing_data_state=restart_data)
        data_state, note, state = None, "fresh start", None
        start = 0
        if restored is not None:
            start, state, _, data_state = restored
            note = f"resumed from step {start}"
            line, jump = schedule_change(saved or restored[2], cfg, start)
            if jump and not confirm_schedule_change:
                raise ResumeError(
                    f"{line}. Pass --yes (confirm_schedule_change=True) to continue with this "
                    "schedule; to decay from a stable-phase checkpoint instead, run a branch "
                    "decay (decay_from=STEP decay_steps=N), which leaves this run as it is.")
            if line:
                changes.append(line)
        elif source_ckpts is not None:
            start, state, _, data_state = source_ckpts.restore(
                program.abstract_state, step=decay_start,
                allow_missing_data_state=restart_data or branch_new_data)
            if branch_new_data:
                data_state = None  # the decay switches the data mixture: a fresh pipeline
                changes.append("the branch decays on other data: its data pipeline starts "
                               "afresh")
            note = f"branch decay from step {start} of {branch_from}"
        init_params = None
        if state is None and t.init_from:   # read (and checked) before anything is written
            from mcpm.train.init_from import load_init_params
            init_params = load_init_params(cfg)
            note = f"fresh optimizer and schedule on the weights of {t.init_from}"
        if data_state is not None:  # before any write: an unusable data state refuses here
            try:
                source.set_state(data_state)
            except OldStateError as e:
                if not restart_data:
                    raise
                warnings.warn(f"{e} (--restart-data: the data pipeline starts afresh)",
                              stacklevel=2)
        if start >= total:
            done = {}
            if (run_dir / "summary.json").is_file():  # what the run that got here reported
                with contextlib.suppress(OSError, ValueError):
                    done = json.loads((run_dir / "summary.json").read_text())
            return {**done, "run_dir": str(run_dir), "step": start,
                    "note": f"already at step {start}", "preempted": False, "signal": None}

        # 4. The run goes on: now write
        if reinit and run_dir.exists():
            moved = move_aside(run_dir) if is_main else None
            _say(is_main, f"--reinit: moved the previous run to {moved}")
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, run_dir / CONFIG_FILE)
        for line in existing.quarantine_damaged():
            warnings.warn(line, stacklevel=2)
    ckpts = RunCheckpoints(run_dir, t.keep_last, t.keep_every)
    if state is None:
        state = program.init() if init_params is None else program.init_from(init_params)
        del init_params
    step_fn = program.step

    peak = t.peak_flops_per_device or measure_peak_flops()
    flops_per_token = model_flops_per_token(model_cfg, seq_len)
    writer = MetricsWriter(run_dir, enabled=is_main, resume_step=start)
    for line in changes:
        _say(is_main, line)
    if not held_out and is_main and t.eval_batches and data is None:
        _say(is_main, "no held-out data (data.eval_sources) for these training sources: "
                      "eval_loss is not measured")
    _say(is_main, f"{note}; {model_cfg.num_params() / 1e6:.1f}M parameters, mesh "
                  f"{describe(program.mesh)}, batch {global_batch} x {seq_len}, steps {start} "
                  f"-> {total}")

    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        ckpts.save(step, state, to_dict(cfg), data_state=source.get_state())

    pending = None           # (step, metrics) of the step before, fetched one step late
    in_a_row, last_log, last_log_step = 0, time.perf_counter(), start
    last_loss = eval_loss = None
    interval_losses = []     # finite losses since the last log line: their mean is loss_avg
    step = start
    interrupts = _Interrupts(announce=is_main)
    try:
        with interrupts:
            while step < total:
                local = next(source)
                batch = {k: jax.make_array_from_process_local_data(
                    program.batch_sharding, np.asarray(local[k])) for k in BATCH_KEYS}
                state, metrics = step_fn(state, batch)
                step += 1
                if pending is not None:
                    in_a_row, last_loss = _check(pending, in_a_row, t.max_nonfinite_in_a_row)
                    interval_losses += [] if last_loss is None else [last_loss]
                pending = (step, metrics)
                evaluated = {}
                if held_out and (step == total or (t.eval_every and step % t.eval_every == 0)):
                    eval_loss, eval_tokens = held_out.loss(state["params"])
                    evaluated = {"eval_loss": eval_loss, "eval_tokens": eval_tokens}
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
                               **evaluated,
                               **{f"data_{k}": v for k, v in source.stats().items()})
                    writer.write(step, row)
                    last_log, last_log_step, interval_losses = now, step, []
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{row['loss_avg']:.3f}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{tok_s:.0f}",
                            **({} if eval_loss is None else {"eval": f"{eval_loss:.3f}"}))
                elif evaluated:
                    writer.write(step, evaluated)
                if bar is not None:
                    bar.update(1)
                if interrupts.signal is not None:
                    save(step)
                    break
                if step % t.checkpoint_every == 0 or step == total:
                    save(step)
            if pending is not None:
                in_a_row, last_loss = _check(pending, in_a_row, t.max_nonfinite_in_a_row)
    finally:
        if bar is not None:
            bar.close()
        ckpts.close()
        writer.close()
    stopped_by = None if interrupts.signal is None else signal.Signals(interrupts.signal).name
    preempted = stopped_by is not None
    model_dir = None
    if not preempted and jax.process_count() == 1:
        # the trained model as an mcpm checkpoint (tokenizer included): mcpm generate, convert
        from mcpm.checkpoint import save_checkpoint
        tok = getattr(source, "tokenizer_path", None)
        params, extra = jax.device_get(state["params"]), {}
        if cfg.quant.enabled:   # the ternary model itself, and what its ternary tensors are
            from mcpm.quant.qat import QUANT_FILE, quant_info, ternarize_params
            params = ternarize_params(params, cfg.quant, model_cfg)
            extra[QUANT_FILE] = json.dumps(quant_info(cfg.quant, model_cfg), indent=1) + "\n"
        model_dir = str(save_checkpoint(
            run_dir / "model", model_cfg, params,
            aux_dir=Path(tok).parent if tok else None, overwrite=True, extra_files=extra))
    plot = None
    if is_main and (run_dir / "metrics.jsonl").exists():
        plot = str(plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png",
                                f"{run_dir.name}: {model_cfg.num_params() / 1e6:.1f}M parameters"))
    summary = {"run_dir": str(run_dir), "step": step, "loss": last_loss, "eval_loss": eval_loss,
               "preempted": preempted,
               "signal": stopped_by, "note": note, "plot": plot, "checkpoints": ckpts.steps(),
               "model": model_dir}
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
