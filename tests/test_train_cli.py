"""`mcpm train` end to end on the real data pipeline (a small slice of the built-in corpus):
SIGTERM writes a checkpoint and exits 0, and the same command resumes from it."""
import json
import os
import signal
import subprocess
import sys
import time

from mcpm.train.metrics import read_metrics


def train_cmd(tmp_path, steps):
    return [sys.executable, "-m", "mcpm.cli", "train", "configs/tiny.yaml",
            f"workdir={tmp_path / 'run'}", f"steps={steps}", "--no-progress",
            "model.num_hidden_layers=1", "model.hidden_size=64", "model.intermediate_size=96",
            "model.dim_model_base=16", "model.vocab_size=512", "data.builtin_limit=40",
            "data.builtin_vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}",
            "data.batch_size=4", "data.seq_len=64", "train.log_every=1",
            "train.checkpoint_every=1000", "train.peak_flops_per_device=1e11"]


def test_sigterm_checkpoints_exits_zero_and_the_run_resumes(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(train_cmd(tmp_path, 10_000), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in err
    stopped = int(err.split("checkpoint at step ")[1].split()[0])
    assert stopped >= 3
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [stopped]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["preempted"] and summary["step"] == stopped

    # a shorter run than the 10,000 steps it was started as: its warm-up ends sooner, so the
    # lr changes at the resume step, which --yes accepts
    refused = subprocess.run(train_cmd(tmp_path, stopped + 2), capture_output=True, text=True,
                             env=env, timeout=400)
    assert refused.returncode == 2 and "--yes" in refused.stderr, refused.stderr[-3000:]
    done = subprocess.run(train_cmd(tmp_path, stopped + 2) + ["--yes"], capture_output=True,
                          text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {stopped}; at step {stopped + 2}" in done.stdout
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps[-2:] == [stopped + 1, stopped + 2]
    rows = read_metrics(metrics)
    assert rows[-1]["data_batches"] == stopped + 2  # the data iterator resumed too
    assert (tmp_path / "run" / "model" / "params").is_dir()
