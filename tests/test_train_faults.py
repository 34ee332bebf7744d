"""Fault injection on the training loop: config changes on resume, damaged checkpoints of each
file kind, signals, ``kill -9`` mid-save, missing data states, refused commands. Every resumed
run must give the losses of an uninterrupted one bit for bit, and every refusal must leave the
workdir exactly as it was."""
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_train_loop import config, losses, source

from mcpm.cli import main
from mcpm.train.checkpoints import MissingDataStateError
from mcpm.train.loop import train
from mcpm.train.metrics import read_metrics
from mcpm.train.resume import ResumeError

STEPS = 8
WORKER = Path(__file__).resolve().parent / "train_fault_worker.py"


def run(workdir, *overrides, steps=STEPS, **kw):
    cfg = config(workdir, f"train.steps={steps}", *overrides)
    signals = kw.pop("signals", None)
    return train(cfg, data=source(cfg, signals=signals), progress=False, **kw)


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its size and modification time."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def assert_resumed_exactly(workdir, reference):
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))   # no duplicate rows
    assert losses(workdir) == reference                              # bitwise


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of an uninterrupted run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir)
    return losses(workdir)


@pytest.fixture
def ctrl_c_enabled():
    """SIGINT handled as in a terminal (pytest-xdist workers ignore it, and the loop leaves an
    ignored SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signals_at_any_step_save_and_the_run_resumes_identically(tmp_path, straight,
                                                                 ctrl_c_enabled):
    # a SIGTERM while batch k1 is read, a Ctrl-C while batch k2 is: steps k1 + 1 and k2 + 1
    k1 = int(np.random.default_rng().integers(0, STEPS - 3))
    k2 = int(np.random.default_rng().integers(k1 + 1, STEPS - 1))
    out = run(tmp_path, signals={k1: signal.SIGTERM})
    assert out["preempted"] and out["signal"] == "SIGTERM" and out["step"] == k1 + 1, (k1, k2)
    assert out["checkpoints"][-1] == k1 + 1 and out["model"] is None
    out = run(tmp_path, signals={k2: signal.SIGINT})
    assert out["note"] == f"resumed from step {k1 + 1}", (k1, k2)
    assert out["signal"] == "SIGINT" and out["step"] == k2 + 1, (k1, k2)
    out = run(tmp_path)
    assert out["note"] == f"resumed from step {k2 + 1}" and out["step"] == STEPS
    assert_resumed_exactly(tmp_path, straight)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


def test_kill_9_mid_save_and_a_second_ctrl_c_then_resume(tmp_path, straight):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    killed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "k"), str(STEPS),
                             "kill-mid-save", "6"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "k" / "checkpoints" / "6").exists()      # the save never committed
    assert run(tmp_path / "k")["note"] == "resumed from step 4"
    assert_resumed_exactly(tmp_path / "k", straight)

    twice = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "c"), str(STEPS),
                            "sigint-twice", "5"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert twice.returncode == 130, twice.stderr[-2000:]
    assert "second Ctrl-C: exiting now" in twice.stderr
    assert run(tmp_path / "c")["step"] == STEPS
    assert_resumed_exactly(tmp_path / "c", straight)


def _damage(workdir: Path, kind: str) -> None:
    step = workdir / "checkpoints" / "6"
    if kind == "params":
        (chunk,) = (step / "state" / "params.embed").glob("0*")
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])   # truncated
    elif kind == "optimizer state":
        (chunk,) = (step / "state" / "opt_state.1.mu.embed").glob("0*")
        chunk.write_bytes(b"\0" * chunk.stat().st_size)
    elif kind == "data state":
        path = workdir / "checkpoints" / "data" / "6" / "process_0.json"
        path.write_text(path.read_text()[:-2])    # a torn write
    elif kind == "metadata":
        (step / "state" / "_METADATA").write_text("{")


def test_a_damaged_file_of_each_kind_falls_back_and_the_run_finishes_identically(
        tmp_path, straight, capfd):
    base = tmp_path / "base"
    assert run(base, signals={5: signal.SIGTERM})["checkpoints"] == [4, 6]   # stopped at 6
    for kind in ("params", "optimizer state", "data state", "metadata"):
        workdir = tmp_path / kind.replace(" ", "_")
        shutil.copytree(base, workdir)
        _damage(workdir, kind)
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = run(workdir)
            gc.collect()                          # orbax's aborted read coroutines
        err = capfd.readouterr().err
        assert out["note"] == "resumed from step 4", kind
        (warning,) = [str(w.message) for w in seen]   # one line, nothing else
        assert re.search("step 6 could not be restored.*moved it to", warning), warning
        assert "Event loop is closed" not in err and "Traceback" not in err, err[-2000:]
        (quarantined,) = (workdir / "quarantine").iterdir()
        assert (quarantined / "checkpoint" / "state").is_dir(), kind
        assert 6 in out["checkpoints"], kind                 # the step was saved again
        assert_resumed_exactly(workdir, straight)


def test_config_changes_that_may_resume_do_and_others_refuse_without_a_trace(tmp_path, capsys):
    run(tmp_path, "train.schedule.decay_fraction=0.0", steps=4)
    before = snapshot(tmp_path)
    refused = {"model.num_hidden_layers=3": "model.num_hidden_layers: 2 -> 3",
               "seed=1": "seed: 0 -> 1",
               "train.schedule.peak_lr=0.02": "train.schedule.peak_lr: 0.01 -> 0.02",
               "train.optimizer.b2=0.99": "train.optimizer.b2: 0.95 -> 0.99",
               "data.seq_len=16": "data.seq_len: 32 -> 16",
               "model.param_dtype=bfloat16": "model.param_dtype: 'float32' -> 'bfloat16'"}
    for override, line in refused.items():
        with pytest.raises(ResumeError) as e:
            run(tmp_path, "train.schedule.decay_fraction=0.0", override, steps=6)
        assert line in str(e.value) and "--reinit" in str(e.value) and "workdir" in str(e.value)
        assert snapshot(tmp_path) == before, override
    # through the CLI: exit 2, the message, nothing written (the data is never opened)
    rc = main(["train", "configs/tiny.yaml", f"workdir={tmp_path}", "steps=6", "--no-progress",
               "model.num_hidden_layers=3", "model.hidden_size=64", "model.intermediate_size=96",
               "model.dim_model_base=16", "model.vocab_size=256"])
    assert rc == 2 and "model.num_hidden_layers: 2 -> 3" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    # allowed: length, logging, checkpoint cadence, mesh, remat, accumulation
    out = run(tmp_path, "train.schedule.decay_fraction=0.0", "train.log_every=2",
              "train.checkpoint_every=1", "train.keep_last=5", "mesh.data=1", "model.remat=full",
              "train.accum_steps=2", steps=6)
    assert out["note"] == "resumed from step 4" and out["step"] == 6
    assert out["checkpoints"] == [2, 4, 5, 6]
    printed = capsys.readouterr().out
    assert "train.log_every: 1 -> 2" in printed and "train.steps: 4 -> 6" in printed
    assert "the decay starts at step 6 (was 4)" in printed


def test_extending_a_finished_run_asks_before_it_rewarms(tmp_path, capsys):
    decay = ("train.schedule.decay_fraction=0.5", "train.schedule.decay_shape=linear")
    run(tmp_path, *decay, steps=4)
    before = snapshot(tmp_path)
    with pytest.raises(ResumeError, match=r"at step 4 the lr jumps from 0 to 0\.01 \(back to the "
                                          r"stable phase: a re-warm-up\).*decay starts at step 6 "
                                          r"\(was 2\).*--yes.*decay_from=STEP"):
        run(tmp_path, *decay, steps=12)
    assert snapshot(tmp_path) == before
    out = run(tmp_path, *decay, steps=12, confirm_schedule_change=True)
    assert out["note"] == "resumed from step 4" and out["step"] == 12
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[4]["lr"] == pytest.approx(0.01)   # step 5 trains at the peak again


def test_missing_data_state_refuses_then_restarts_the_data_when_asked(tmp_path):
    run(tmp_path, steps=4)
    (tmp_path / "checkpoints" / "data" / "4" / "process_0.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(MissingDataStateError, match="data/4/process_0.json is missing"):
        run(tmp_path, steps=6)
    assert snapshot(tmp_path) == before
    with pytest.warns(UserWarning, match="the data pipeline restarts from its beginning"):
        out = run(tmp_path, steps=6, restart_data=True, confirm_schedule_change=True)
    assert out["note"] == "resumed from step 4"
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["data_batches"] == 2   # batches 0, 1


def test_an_older_pipelines_data_state_refuses_before_any_write(tmp_path):
    from mcpm.data.pipeline import OldStateError
    from test_train_loop import CountingSource

    class Older(CountingSource):
        def set_state(self, state):
            raise OldStateError("the data state is from an older pipeline")

    run(tmp_path, steps=4)
    before = snapshot(tmp_path)
    cfg = config(tmp_path, "train.steps=6")
    older = Older(cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    with pytest.raises(OldStateError, match="older pipeline"):
        train(cfg, data=older, progress=False, confirm_schedule_change=True)
    assert snapshot(tmp_path) == before
    with pytest.warns(UserWarning, match="older pipeline.*--restart-data"):
        out = train(cfg, data=older, progress=False, confirm_schedule_change=True,
                    restart_data=True)
    assert out["note"] == "resumed from step 4" and out["step"] == 6


def test_refused_commands_leave_nothing_behind_and_reinit_moves_the_run_aside(tmp_path):
    # a mesh the devices cannot form: no workdir at all
    with pytest.raises(Exception, match="mesh"):
        run(tmp_path / "fresh", "mesh.data=3")
    assert not (tmp_path / "fresh").exists()
    run(tmp_path / "run", "train.schedule.decay_fraction=0.0", steps=4)
    before = snapshot(tmp_path / "run")
    with pytest.raises(Exception, match="mesh"):
        run(tmp_path / "run", "train.schedule.decay_fraction=0.0", "mesh.data=3", steps=4)
    # a branch from a step that has no checkpoint: no decay_from_3/
    with pytest.raises(ResumeError, match=r"no checkpoint at step 3 \(it has: \[2, 4\]\)"):
        run(tmp_path / "run", "train.schedule.decay_fraction=0.0", "train.decay_from=3",
            "train.decay_steps=2", steps=4)
    assert snapshot(tmp_path / "run") == before
    # starting over on purpose: the old run is moved aside intact
    out = run(tmp_path / "run", "model.num_hidden_layers=1", steps=2, reinit=True)
    assert out["note"] == "fresh start" and out["step"] == 2
    (old,) = tmp_path.glob("run.reinit-*")
    assert snapshot(old) == before
    np.testing.assert_array_equal(sorted(p.name for p in (tmp_path / "run").iterdir()),
                                  sorted(["checkpoints", "config.yaml", "loss.png", "metrics.jsonl",
                                          "model", "summary.json", "tensorboard"]))


def test_a_workdir_holding_other_files_is_refused_not_written_over(tmp_path):
    """A directory with files but no run (no config.yaml, no checkpoint) could be someone's
    output: a fresh run there would replace its model/ and metrics.jsonl."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"not ours")
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    before = snapshot(tmp_path)
    with pytest.raises(ResumeError, match="holds files but no mcpm run.*--reinit"):
        run(tmp_path, steps=2)
    assert snapshot(tmp_path) == before
