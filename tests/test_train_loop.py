"""The training loop: outputs of a run, branch decay, non-finite stop (resumes and faults:
tests/test_train_faults.py).

A small deterministic in-memory batch source stands in for the data pipeline here (its own
tests cover it); tests/test_train_cli.py runs the real pipeline end to end."""
import json
import os

import numpy as np
import pytest

from mcpm.config import load_config
from mcpm.train.loop import TrainingError, train
from mcpm.train.metrics import read_metrics


class CountingSource:
    """Batch k is a pure function of (seed, k); the state is k. ``signals``: {k: signal} sends
    this process that signal while batch k is being read (a preemption or Ctrl-C mid-step)."""

    def __init__(self, batch, seq_len, vocab, seed=0, nan_from=None, signals=None):
        self.batch, self.seq_len, self.vocab, self.seed = batch, seq_len, vocab, seed
        self.k, self.nan_from, self.signals = 0, nan_from, dict(signals or {})

    def __next__(self):
        if self.k in self.signals:
            os.kill(os.getpid(), self.signals.pop(self.k))
        rng = np.random.default_rng((self.seed, self.k))
        ids = rng.integers(3, self.vocab, (self.batch, self.seq_len + 1))
        ids[:, 1::2] = ids[:, 0:-1:2]  # learnable: every odd token repeats the one before
        w = np.ones((self.batch, self.seq_len), np.float32)
        if self.nan_from is not None and self.k >= self.nan_from:
            w[0, 0] = np.nan
        self.k += 1
        return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
                "weights": w, "positions": np.broadcast_to(np.arange(self.seq_len),
                                                           (self.batch, self.seq_len)).astype(np.int32),
                "segment_ids": np.ones((self.batch, self.seq_len), np.int32)}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]

    def stats(self):
        return {"batches": self.k}


def config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [
        f"train.workdir={tmp_path}", "model.num_hidden_layers=2", "model.hidden_size=64",
        "model.intermediate_size=96", "model.dim_model_base=16", "model.vocab_size=256",
        "data.batch_size=4", "data.seq_len=32", "train.log_every=1", "train.checkpoint_every=2",
        "train.schedule.warmup_steps=2", "train.schedule.peak_lr=0.01",
        "train.peak_flops_per_device=1e11", *extra])


def source(cfg, **kw):
    return CountingSource(cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size, **kw)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_outputs_of_a_run_and_loss_avg(tmp_path):
    straight = config(tmp_path / "a", "train.steps=6")
    out = train(straight, data=source(straight), progress=False)
    assert out["step"] == 6 and out["checkpoints"][-1] == 6 and out["note"] == "fresh start"
    assert losses(tmp_path / "a")[-1] < losses(tmp_path / "a")[0]
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_batches"} <= set(rows[0])
    assert (tmp_path / "a" / "loss.png").is_file()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["step"] == 6
    # the same steps again: nothing to do
    assert train(straight, data=source(straight), progress=False)["note"] == "already at step 6"
    # logging every 3 steps: loss_avg is the mean of the per-step losses of the interval
    every3 = config(tmp_path / "c", "train.steps=6", "train.log_every=3")
    train(every3, data=source(every3), progress=False)
    rows3 = read_metrics(tmp_path / "c" / "metrics.jsonl")
    per_step = losses(tmp_path / "a")
    assert [r["step"] for r in rows3] == [3, 6]
    assert [r["loss"] for r in rows3] == [per_step[2], per_step[5]]
    np.testing.assert_allclose([r["loss_avg"] for r in rows3],
                               [np.mean(per_step[:3]), np.mean(per_step[3:])], rtol=1e-6)


def test_branch_decay_restores_the_stable_checkpoint_and_leaves_the_main_run(tmp_path):
    main = config(tmp_path, "train.steps=4", "train.schedule.decay_fraction=0.0")
    train(main, data=source(main), progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    branch = config(tmp_path, "train.steps=4", "train.schedule.decay_fraction=0.0",
                    "train.decay_from=2", "train.decay_steps=3",
                    "train.schedule.decay_shape=linear")
    out = train(branch, data=source(branch), progress=False)
    assert out["run_dir"] == str(tmp_path / "decay_from_2") and out["step"] == 5
    rows = read_metrics(tmp_path / "decay_from_2" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 5]
    np.testing.assert_allclose([r["lr"] for r in rows], [0.01, 0.01 * 2 / 3, 0.01 / 3], rtol=1e-5)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    # its first step continues the main run's data: step 3 of the branch = step 3 of main
    main_rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["loss"] == main_rows[2]["loss"]


def test_non_finite_steps_in_a_row_stop_the_run_clearly(tmp_path):
    cfg = config(tmp_path, "train.steps=10", "train.max_nonfinite_in_a_row=3")
    with pytest.raises(TrainingError, match="3 steps in a row up to step 5"):
        train(cfg, data=source(cfg, nan_from=2), progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[2]["loss"] is None and rows[2]["skipped"] == 1


def _held_out_loss(model_dir, batches):
    """The held-out loss stated independently: the saved model's logits, float64 log-softmax
    in numpy, every target token of every batch weighted equally."""
    import jax
    from mcpm.api import from_pretrained
    model = from_pretrained(model_dir)
    nll = tokens = 0.0
    for b in batches:
        logits = np.asarray(jax.device_get(model(b["inputs"], positions=b["positions"],
                                                 segment_ids=b["segment_ids"])), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        nll -= (picked * b["weights"]).sum()
        tokens += b["weights"].sum()
    return nll / tokens, tokens


def test_held_out_loss_every_eval_every_steps_and_at_the_end(tmp_path):
    cfg = config(tmp_path / "e", "train.steps=5", "train.eval_every=2", "train.log_every=2")
    held = [next(source(cfg, seed=99)) for _ in range(3)]
    held[1]["weights"][:, ::3] = 0.0  # unequal token counts: a mean of batch means would differ
    out = train(cfg, data=source(cfg), eval_data=held, progress=False)
    rows = read_metrics(tmp_path / "e" / "metrics.jsonl")
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 5]
    # one row per step: the eval joins the step's log row when both fall on it
    assert [r["step"] for r in rows] == [2, 4, 5]
    want, tokens = _held_out_loss(out["model"], held)
    # float32 forward: the per-token log-probabilities are exact to a few eps x their size
    # (|logit| + log V ~ 10), and the mean of n of them to the same relative error
    np.testing.assert_allclose(evals[5], want, rtol=50 * np.finfo(np.float32).eps)
    assert out["eval_loss"] == evals[5] and rows[-1]["eval_tokens"] == tokens
    assert evals[5] < evals[2]  # the held-out data is learnable (same rule, other tokens)
    # evaluating never touches training: the same run without held-out data trains identically
    plain = config(tmp_path / "p", "train.steps=5", "train.log_every=2")
    train(plain, data=source(plain), progress=False)
    assert losses(tmp_path / "p") == [r["loss"] for r in rows]


def test_held_out_data_of_the_builtin_corpus_is_its_validation_split(tmp_path):
    from mcpm.config import ConfigError
    cfg = load_config("configs/tiny.yaml", ["data.builtin_limit=60"])
    assert [s.split for s in cfg.data.eval_source_list()] == ["validation"]
    mixed = load_config("configs/tiny.yaml", [
        "data.sources=[{kind: builtin}, {kind: files, paths: ['x/*.txt']}]"])
    assert mixed.data.eval_source_list() == ()  # the user's own files: no silent guess
    with pytest.raises(ConfigError, match="eval_sources.*also a training source"):
        load_config("configs/tiny.yaml", ["data.eval_sources=[{kind: builtin, split: train}]"])
