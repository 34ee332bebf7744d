"""`mcpm tunnel search`: the samplers with a cheap objective, failed and interrupted trials,
two worker processes on one SQLite study, and a real search killed and resumed."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mcpm.config import UserError, load_config
from mcpm.tunnel.search import run_search, write_best_yaml
from mcpm.tunnel.trial import TrialDiverged


def config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [f"tunnel.search.workdir={tmp_path / 'search'}",
                                             *extra])


def quadratic(cfg, workdir, *, steps, decay_steps, objective="eval_loss", indicator_data="",
              progress=False):
    """A bowl at peak_lr 0.01, scale_depth 3; leaves a file per call in the trial's folder."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"call-{os.getpid()}-{time.monotonic_ns()}").touch()
    value = (math.log10(cfg.train.schedule.peak_lr) + 2) ** 2 + \
        (cfg.model.scale_depth - 3) ** 2 / 10
    return {"objective": value, "eval_loss": value, "train_loss": value + 0.5,
            "indicator_loss": None, "steps": steps + decay_steps, "tokens": 1000,
            "run_dir": str(workdir), "branch_dir": str(workdir / f"decay_from_{steps}")}


def flaky(cfg, workdir, **kw):
    if cfg.train.schedule.peak_lr > 0.03:
        raise TrialDiverged("the loss is nan at step 3")
    if cfg.model.scale_depth > 6:
        raise ValueError("a bad config")
    return quadratic(cfg, workdir, **kw)


def rows(tmp_path):
    return [json.loads(x) for x in (tmp_path / "search" / "results.jsonl").read_text().splitlines()]


def calls(tmp_path):
    return sorted(p.parent.name for p in (tmp_path / "search" / "trials").glob("*/call-*"))


def test_tpe_finds_the_region_and_writes_every_output(tmp_path):
    cfg = config(tmp_path, "tunnel.search.params=[peak_lr,scale_depth]", "tunnel.search.trials=24")
    result = run_search(cfg, trial_fn=quadratic, progress=False, target_width=128)
    assert 10 ** -2.6 < result.best_params["peak_lr"] < 10 ** -1.4
    assert result.best_value < 0.4 and result.complete == 24 and result.failed == 0
    table = rows(tmp_path)
    assert [r["number"] for r in table] == list(range(24))
    assert {r["state"] for r in table} == {"COMPLETE"}
    best_row = min(table, key=lambda r: r["value"])
    assert best_row["number"] == result.best_number
    assert best_row["peak_lr"] == result.best_params["peak_lr"]
    assert best_row["init_std"] == cfg.model.initializer_range  # not searched: the config's
    assert {"eval_loss", "train_loss", "tokens", "run_dir", "duration_s", "error"} <= set(best_row)
    best = load_config(result.best_yaml)
    assert best.train.schedule.peak_lr == result.best_params["peak_lr"]
    assert best.model.scale_depth == result.best_params["scale_depth"]
    assert best.model.hidden_size == cfg.model.hidden_size
    wide = load_config(tmp_path / "search" / "best-width128.yaml")
    assert wide.model.hidden_size == 128 and wide.model.scale_depth == best.model.scale_depth
    assert [p.name for p in result.plots] == ["search_objective.png", "search_history.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)
    assert len(calls(tmp_path)) == 24

    # the same command again: nothing reruns; more trials: only the new ones run
    again = run_search(cfg, trial_fn=quadratic, progress=False)
    assert len(calls(tmp_path)) == 24 and again.best_number == result.best_number
    more = config(tmp_path, "tunnel.search.params=[peak_lr,scale_depth]", "tunnel.search.trials=26")
    extended = run_search(more, trial_fn=quadratic, progress=False)
    assert extended.complete == 26 and extended.best_value <= result.best_value
    assert len(calls(tmp_path)) == 26

    # another search in the same study is refused, naming the study and the way out
    other = config(tmp_path, "tunnel.search.params=[peak_lr,scale_depth]",
                   "tunnel.search.steps=7")
    with pytest.raises(UserError, match=r"study 'mcpm' in sqlite:.*steps: 100 -> 7.*study= name"):
        run_search(other, trial_fn=quadratic, progress=False)
    study = optuna.load_study(study_name="mcpm",
                              storage=f"sqlite:///{tmp_path / 'search' / 'search.db'}")
    out = write_best_yaml(study, cfg, tmp_path / "again.yaml")
    assert load_config(out).train.schedule.peak_lr == extended.best_params["peak_lr"]


def test_grid_runs_every_combination_once(tmp_path):
    cfg = config(tmp_path, "tunnel.search.sampler=grid",
                 "tunnel.search.params=[peak_lr,batch_size]", "tunnel.search.grid_points=3", "tunnel.search.batch_sizes=[4,8]",
                 "tunnel.search.trials=2")  # the grid's size wins
    result = run_search(cfg, trial_fn=quadratic, progress=False)
    table = rows(tmp_path)
    assert result.complete == 6 and len(table) == 6
    seen = sorted((r["peak_lr"], r["batch_size"]) for r in table)
    assert seen == sorted(itertools.product([0.001, 0.01, 0.1], [4, 8]))
    assert math.isclose(result.best_params["peak_lr"], 0.01)
    assert load_config(result.best_yaml).data.batch_size == result.best_params["batch_size"]


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path):
    cfg = config(tmp_path, "tunnel.search.params=[peak_lr,scale_depth]", "tunnel.search.trials=12")
    result = run_search(cfg, trial_fn=flaky, progress=False)
    table = rows(tmp_path)
    assert len(table) == 12 and result.complete + result.failed == 12
    diverged = [r for r in table if r["peak_lr"] > 0.03]
    bad = [r for r in table if r["peak_lr"] <= 0.03 and r["scale_depth"] > 6]
    assert diverged and bad and result.complete > 0
    assert all(r["state"] == "FAIL" and r["value"] is None for r in diverged + bad)
    assert all(r["error"] == "TrialDiverged: the loss is nan at step 3" for r in diverged)
    assert all(r["error"] == "ValueError: a bad config" for r in bad)
    assert all(r["state"] == "COMPLETE" and r["error"] is None for r in table
               if r not in diverged + bad)
    assert result.best_params["peak_lr"] <= 0.03 and result.best_params["scale_depth"] <= 6
    assert all(p.is_file() for p in result.plots)


def test_an_interrupted_trial_runs_again_when_the_search_resumes(tmp_path):
    cfg = config(tmp_path, "tunnel.search.params=[peak_lr]", "tunnel.search.trials=4")
    count = []

    def interrupted_third(cfg, workdir, **kw):
        count.append(workdir)
        if len(count) == 3:
            (Path(workdir) / "partial").parent.mkdir(parents=True, exist_ok=True)
            (Path(workdir) / "partial").touch()
            raise KeyboardInterrupt()
        return quadratic(cfg, workdir, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, trial_fn=interrupted_third, progress=False)
    table = rows(tmp_path)
    assert [r["state"] for r in table] == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert table[2]["error"].startswith("interrupted")
    result = run_search(cfg, trial_fn=quadratic, progress=False)
    table = rows(tmp_path)
    # the retry has trial 2's settings and folder (where its run resumes); two more new trials
    assert table[3]["retry_of"] == 2 and table[3]["peak_lr"] == table[2]["peak_lr"]
    assert table[3]["run_dir"] == str(tmp_path / "search" / "trials" / "2")
    assert [r["state"] for r in table] == ["COMPLETE"] * 2 + ["FAIL"] + ["COMPLETE"] * 2
    assert result.complete == 4 and result.failed == 0
    assert calls(tmp_path) == ["0", "1", "2", "4"]


@pytest.mark.filterwarnings("ignore")  # optuna's notes on heartbeats outside optimize
def test_trials_of_lost_workers_are_retried(tmp_path):
    cfg = config(tmp_path, "tunnel.search.params=[peak_lr]", "tunnel.search.trials=1")
    run_search(cfg, trial_fn=quadratic, progress=False)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'search' / 'search.db'}",
                                         heartbeat_interval=1, grace_period=1)
    study = optuna.load_study(study_name="mcpm", storage=storage)
    study.ask()  # a worker that died before it wrote anything: no heartbeat, no worker
    lost = study.ask({"peak_lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    lost.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "lock": "/nonexistent"})
    storage.record_heartbeat(lost._trial_id)  # another host's worker, silent since
    time.sleep(1.5)
    more = config(tmp_path, "tunnel.search.params=[peak_lr]", "tunnel.search.trials=3")
    result = run_search(more, trial_fn=quadratic, progress=False, heartbeat_interval=1,
                        grace_period=1)
    table = rows(tmp_path)
    assert result.complete == 3 and result.failed == 0
    assert [(r["state"], r["retry_of"]) for r in table] == [
        ("COMPLETE", None), ("FAIL", None), ("FAIL", None), ("COMPLETE", 1), ("COMPLETE", 2)]
    assert table[4]["peak_lr"] == lost.params["peak_lr"]
    assert table[1]["error"] == "its worker ended while it ran"
    assert "heartbeat" in table[2]["error"]


def barrier(cfg, workdir, **kw):
    """Waits (once per process) until two processes run trials, so both workers take part."""
    here = Path(cfg.tunnel.search.workdir) / "barrier"
    here.mkdir(exist_ok=True)
    (here / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(here.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    return quadratic(cfg, workdir, **kw)


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    cfg = config(tmp_path, "tunnel.search.params=[peak_lr,init_std]", "tunnel.search.trials=10",
                 "tunnel.search.parallel=2")
    result = run_search(cfg, trial_fn=barrier, progress=False)
    table = rows(tmp_path)
    assert result.complete == 10 and [r["number"] for r in table] == list(range(10))
    assert {r["state"] for r in table} == {"COMPLETE"}
    assert calls(tmp_path) == sorted(str(i) for i in range(10))  # each trial ran once
    assert len(list((tmp_path / "search" / "barrier").iterdir())) == 2
    study = optuna.load_study(study_name="mcpm",
                              storage=f"sqlite:///{tmp_path / 'search' / 'search.db'}")
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2
    assert len({t.params["peak_lr"] for t in study.trials}) == 10  # the workers sample apart


def test_bad_storage_and_bad_settings_are_user_errors(tmp_path, capsys):
    from mcpm.cli import main
    rc = main(["tunnel", "search", "configs/tiny.yaml", f"workdir={tmp_path / 's'}",
               "storage=nosuchdb://u:secret@host/db"])
    err = capsys.readouterr().err
    assert rc == 2 and "storage 'nosuchdb://u:***@host/db' cannot be opened" in err
    assert "secret" not in err
    rc = main(["tunnel", "search", "configs/tiny.yaml", f"workdir={tmp_path / 's'}", "trials=0"])
    assert rc == 2 and "trials must be >= 1" in capsys.readouterr().err


# -- a real search, killed after its first trial and resumed --------------------------------------

def real_overrides(tmp_path):
    return [f"workdir={tmp_path / 'search'}", "trials=2", "steps=3", "decay_steps=1",
            "params=[init_std]", "model.num_hidden_layers=1", "model.hidden_size=64",
            "model.intermediate_size=96", "model.dim_model_base=16", "model.vocab_size=512",
            "data.builtin_limit=40", "data.builtin_vocab_size=512",
            f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", "data.seq_len=32",
            "train.eval_batches=1", "train.schedule.warmup_steps=1", "train.log_every=1",
            "train.peak_flops_per_device=1e11"]


def test_a_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    from mcpm.train.loop import train
    from mcpm.tunnel.cli import section_overrides
    from mcpm.tunnel.trial import run_trial

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # a file, not a pipe that nobody reads until the end
        proc = subprocess.Popen([sys.executable, "-m", "mcpm.cli", "tunnel", "search",
                                 "configs/tiny.yaml", *real_overrides(tmp_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    db = tmp_path / "search" / "search.db"
    deadline, trials = time.time() + 300, []
    # kill it while trial 1 runs, trial 0 being complete
    while time.time() < deadline and proc.poll() is None and \
            [(t.state.name, "worker" in t.user_attrs) for t in trials] != \
            [("COMPLETE", True), ("RUNNING", True)]:
        time.sleep(0.2)
        if "mcpm tunnel search: study" in log.read_text():  # the study exists
            storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_table_creation=True)
            trials = optuna.load_study(study_name="mcpm", storage=storage).trials
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = trials[0]

    cfg = load_config("configs/tiny.yaml",
                      section_overrides("search", real_overrides(tmp_path)))
    ran = []

    def counted(cfg, workdir, **kw):
        ran.append(Path(workdir).name)
        return run_trial(cfg, workdir, **kw)

    result = run_search(cfg, trial_fn=counted, progress=False)
    assert result.complete == 2 and result.failed == 0
    assert "0" not in ran and len(ran) == 1  # the finished trial did not run again
    study = optuna.load_study(study_name="mcpm", storage=f"sqlite:///{db}")
    trial0 = study.trials[0]
    assert trial0.state.name == "COMPLETE" and trial0.datetime_start == first.datetime_start
    # trial 1's worker was killed: it failed at once, and its retry ran in its folder
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert ran == ["1"] and study.trials[1].user_attrs["error"] == "its worker ended while it ran"
    assert study.trials[2].user_attrs["retry_of"] == 1
    assert study.trials[2].params == study.trials[1].params != trial0.params
    best = load_config(result.best_yaml, [f"train.workdir={tmp_path / 'retrain'}",
                                          "train.steps=2"])
    assert best.model.initializer_range == result.best_params["init_std"]
    summary = train(best, progress=False)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])

