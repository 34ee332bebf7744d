"""``mcpm tunnel search``: an optuna study of a muP proxy's hyperparameters (training spec
section 2), resumable, on one or several workers.

The study
    lives in an RDB storage, ``tunnel.search.storage``, or ``sqlite:///WORKDIR/search.db`` when
    that is empty (WORKDIR is ``tunnel.search.workdir``). Every worker loads the study by name
    and takes trials until the study holds ``trials`` of them (``grid``: one per combination),
    counting every worker's. Values only compare within one search, so the search space, the
    trial length, the objective and the rest of the config are stored with the study, and a
    command that differs in any of them is refused: use another ``study=`` name.

A trial
    trains ``with_hparams(cfg, **suggested)`` through ``trial_fn`` (:func:`mcpm.tunnel.trial.
    run_trial`) in ``WORKDIR/trials/NUMBER``; its value is the result's ``objective``, and the
    settings, every returned metric, the duration and any error text are its user attrs. Only
    the settings named in ``tunnel.search.params`` are searched: ``peak_lr`` log-uniformly, the
    others uniformly in their ``[low, high]``, ``batch_size`` over ``batch_sizes``. ``tpe`` uses
    optuna's TPE, seeded by ``seed`` (a resumed run or another worker by ``seed``, the worker
    and the trials so far, so it does not draw the first run's numbers again; the constant
    liar keeps parallel workers apart); ``grid`` takes
    ``grid_points`` values of each range (log-spaced for ``peak_lr``) and every combination once.
    Any exception in a trial (divergence, a bad config, out of memory) makes it FAIL with the
    error text stored; the search goes on.

Resuming
    Finished trials (COMPLETE or FAIL) are never rerun: the same command carries on where a
    killed one stopped. A trial whose worker ended while it ran (Ctrl-C, a kill, a lost host) is
    marked FAIL and enqueued again with the same settings; the retry (user attr ``retry_of``)
    runs in the first attempt's directory, so its training resumes from its last checkpoint,
    and the attempts count as one trial (at most ``MAX_RETRIES`` retries). Ended workers are
    found two ways. A worker holds an exclusive lock on ``WORKDIR/workers/HOST-PID-ID.lock``
    while it lives and the operating system drops the lock however it ends, so a trial of this
    host whose lock is free is retried at once. Other hosts' trials are retried once optuna's
    heartbeat (every ``heartbeat_interval`` s) is ``grace_period`` s old, and a trial whose
    worker ended before it wrote anything once it is that old. Ctrl-C (or SIGTERM) marks the
    running trial FAIL and enqueues it again in the same way, writes the outputs and stops.

Several workers
    Local workers (``parallel`` > 1) are ``multiprocessing`` "spawn" processes with the parent's
    environment; they die with the parent. A worker counts the study's trials and asks for the
    next one under a file lock (``WORKDIR/search.lock``), so they never start more than
    ``trials``. Devices: on GPUs each worker sees its own ``n // parallel`` of them through
    ``CUDA_VISIBLE_DEVICES`` (with fewer GPUs than workers they share them round-robin, without
    preallocating memory); on CPU with several virtual devices each gets ``n // parallel``
    (``JAX_NUM_CPU_DEVICES``); one process owns a host's TPU chips, so TPU searches run
    ``parallel=1`` per host. Several hosts run the same command against a server database,
    e.g. ``storage=postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB`` (``pip install
    psycopg2-binary`` there); hosts do not share the file lock, so two hosts that take the last
    trial at the same moment leave one extra. A worker with nothing left to start waits for the
    trials still running elsewhere (one may need a retry), then ends.

Outputs (WORKDIR, rewritten whole after every finished trial by :mod:`.search_outputs`)
    ``results.jsonl`` (a row per trial of the study: number, state, value, settings, metrics,
    error, duration), ``best.yaml`` (the config with the best trial's settings, ready for
    ``mcpm train``; :func:`write_best_yaml` also writes it at another width under muP),
    ``search_objective.png`` (the objective against each searched setting) and
    ``search_history.png`` (the objective per trial, with the running best); the plots at most
    every ``PLOT_EVERY_S`` seconds and at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

from mcpm.config import Config, TunnelConfig, UserError, to_dict
from mcpm.train.resume import RESUMABLE, flatten, may_change
from mcpm.tunnel.proxy import at_width, hparams_of, with_hparams
from mcpm.tunnel.search_outputs import (BEST, TABLE, _best, _groups, _Reporter, _root,  # noqa: F401
                                        format_table, write_best_yaml, write_plots)
from mcpm.tunnel.trial import TrialDiverged

MAX_RETRIES = 2
HOST = socket.gethostname()
# where each searchable setting lives in the config (for the comparison of setups)
SETTING_KEYS = {"peak_lr": "train.schedule.peak_lr", "init_std": "model.initializer_range",
                "scale_emb": "model.scale_emb", "scale_depth": "model.scale_depth",
                "batch_size": "data.batch_size"}


@dataclasses.dataclass
class SearchResult:
    """What :func:`run_search` found; ``best_*`` are None when no trial completed."""

    best_params: dict | None
    best_value: float | None
    best_number: int | None
    table_path: Path
    best_yaml: Path | None
    plots: list[Path]
    complete: int
    failed: int
    study: str
    storage: str


class _TrialFailed(Exception):
    """A trial raised; optuna records it as FAIL and the search goes on."""


# -- the search space ---------------------------------------------------------------------------

def grid_space(sc) -> dict[str, list]:
    """The grid sampler's values of each searched setting."""
    import numpy as np
    space = {}
    for name in sc.params:
        if name == "batch_size":
            space[name] = sorted(set(sc.batch_sizes))
            continue
        lo, hi = getattr(sc, name)
        spaced = (np.geomspace if name == "peak_lr" else np.linspace)(lo, hi, sc.grid_points)
        # short decimals for the table and best.yaml, still inside the range
        space[name] = sorted({min(max(float(f"{v:.6g}"), lo), hi) for v in spaced})
    return space


def search_size(sc) -> int:
    """How many trials the search runs: ``trials``, or the grid's size."""
    if sc.sampler != "grid":
        return sc.trials
    return math.prod(len(v) for v in grid_space(sc).values())


def _suggest(trial, sc) -> dict:
    out = {}
    for name in sc.params:
        if name == "batch_size":
            out[name] = trial.suggest_categorical(name, sorted(set(sc.batch_sizes)))
        else:
            lo, hi = getattr(sc, name)
            out[name] = trial.suggest_float(name, lo, hi, log=name == "peak_lr")
    return out


def _sampler(sc, seed: int, worker: int = 0, done: int = 0):
    """The sampler of local worker ``worker`` joining a study of ``done`` trials: a resumed or
    second worker draws other random numbers than the first run did."""
    import numpy as np
    import optuna
    if worker or done:
        seed = int(np.random.SeedSequence([seed, worker, done]).generate_state(1)[0])
    if sc.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(sc), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _setup(cfg: Config) -> dict:
    """What must match for two commands to share a study: everything that changes a value."""
    sc = cfg.tunnel.search
    base = dataclasses.replace(cfg, tunnel=TunnelConfig(),
                               train=dataclasses.replace(cfg.train, workdir=""))
    flat = flatten(json.loads(json.dumps(to_dict(base))))
    for name in sc.params:
        flat.pop(SETTING_KEYS[name], None)
    # what a run may change on resume (logging, the mesh, data threads) changes no value
    flat = {k: v for k, v in flat.items() if not may_change(k, RESUMABLE)}
    space = (grid_space(sc) if sc.sampler == "grid" else
             {n: list(sc.batch_sizes) if n == "batch_size" else list(getattr(sc, n))
              for n in sc.params})
    return json.loads(json.dumps({
        "sampler": sc.sampler, "space": space, "steps": sc.steps,
        "decay_steps": sc.decay_steps, "objective": sc.objective,
        "indicator_data": sc.indicator_data, "config": flat}))


# -- storage and study --------------------------------------------------------------------------

def storage_url(sc) -> str:
    if sc.storage:
        return sc.storage
    return "sqlite:///" + str(Path(sc.workdir).resolve() / "search.db")


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@contextlib.contextmanager
def _quiet():
    """Without optuna's warnings about experimental features (heartbeats, constant liar)."""
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class _NoFailureLogs(logging.Filter):
    def filter(self, record):  # the search logs its own line per failed trial
        return not record.getMessage().startswith("Trial ")


def _quiet_optuna() -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    failures = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoFailureLogs) for f in failures.filters):
        failures.addFilter(_NoFailureLogs())


def _open_storage(url: str, heartbeat_interval: int, grace_period: int):
    import optuna
    import sqlalchemy.exc
    # SQLite: several local workers wait for each other's writes instead of failing
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        for attempt in range(3):
            try:
                with _quiet():
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period, heartbeat_stale_trial_callback=_retry)
            except sqlalchemy.exc.IntegrityError:
                if attempt == 2:  # else another worker created the tables at the same moment
                    raise
                time.sleep(1.0)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tunnel.search.storage {_redact(url)!r} cannot be opened: {first}. "
                        "Give an optuna RDB URL, e.g. sqlite:///PATH/search.db or "
                        "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB") from None


def _load_study(cfg: Config, storage, url: str, sampler):
    """The study, created or loaded; refuses one made for a different search."""
    import optuna
    sc = cfg.tunnel.search
    where = f"study {sc.study!r} in {_redact(url)}"
    study = optuna.create_study(study_name=sc.study, storage=storage, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise UserError(f"{where} does not minimize a single objective, as a search does; use "
                        "another study= name")
    setup, saved = _setup(cfg), study.user_attrs.get("mcpm_setup")
    if saved is None:
        if study.get_trials(deepcopy=False):
            raise UserError(f"{where} holds trials of another program (no mcpm search setup); "
                            "use another study= name")
        study.set_user_attr("mcpm_setup", setup)
    elif saved != setup:
        a, b = flatten(saved), flatten(setup)
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserError(f"{where} was made for a different search ({'; '.join(diff[:4])}{more}), "
                        "so its values do not compare with this one's; use another study= name "
                        "(or the study's settings)")
    return study


# -- trials: counting, retrying, running --------------------------------------------------------

def _retry(study, trial) -> None:
    """Enqueue ``trial``'s settings again (its worker ended while it ran)."""
    root = _root(trial)
    attempts = sum(_root(t) == root for t in study.get_trials(deepcopy=False))
    if attempts <= MAX_RETRIES:
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": root})


class _FileLock:
    def __init__(self, path: Path):
        self.path, self._file = path, None

    def acquire(self) -> None:
        import fcntl
        f = open(self.path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


class _Alive:
    """An exclusive lock held while this worker lives; the OS drops it however the process
    ends, so a free lock means an ended worker."""

    def __init__(self, workdir: Path):
        import fcntl
        folder = workdir / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        self._file = open(self.path, "w")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.info = {"host": HOST, "pid": os.getpid(), "lock": str(self.path)}

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _ended(worker) -> bool:
    """Whether the worker ``worker`` (a trial's user attr) is known to have ended."""
    import fcntl
    if not isinstance(worker, dict) or worker.get("host") != HOST or not worker.get("lock"):
        return False
    try:
        f = open(worker["lock"], "a")
    except OSError:
        return False  # cannot tell here: the heartbeat decides
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


def _fail_ended(study, storage, grace_period: float) -> None:
    """FAIL and retry the running trials of this host's ended workers, and those whose worker
    ended before it had written anything (no heartbeat, no worker: optuna would wait)."""
    import datetime

    import optuna
    from optuna.trial import TrialState
    study_id = None
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        orphan = worker is None and t.datetime_start is not None and \
            (now - t.datetime_start).total_seconds() > grace_period
        if not (orphan or _ended(worker)):
            continue
        study_id = study_id if study_id is not None else \
            storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, "error", "its worker ended while it ran")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        _retry(study, storage.get_trial(trial_id))
        if worker is not None:
            Path(worker["lock"]).unlink(missing_ok=True)


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:1000] + " ... " + text[-1000:]


def _json_safe(d: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
            for k, v in d.items()}


def _run_one(trial, study, cfg: Config, trial_fn, worker: dict) -> float:
    sc = cfg.tunnel.search
    trial.set_user_attr("worker", worker)
    start = time.time()
    try:
        params = _suggest(trial, sc)
        trial_cfg = with_hparams(cfg, **params)
        trial.set_user_attr("settings", hparams_of(trial_cfg))
        result = trial_fn(trial_cfg, Path(sc.workdir) / "trials" / str(_root(trial)),
                          steps=sc.steps, decay_steps=sc.decay_steps, objective=sc.objective,
                          indicator_data=sc.indicator_data, progress=False)
        value = float(result["objective"])
        if not math.isfinite(value):
            raise TrialDiverged(f"the objective is {value}")
    except KeyboardInterrupt:
        # left for the resume: FAIL (optuna marks it) and enqueued again
        trial.set_user_attr("error", "interrupted (it runs again when the search resumes)")
        trial.set_user_attr("duration_s", round(time.time() - start, 3))
        _retry(study, trial)
        raise
    except Exception as e:
        trial.set_user_attr("error", _error_text(e))
        trial.set_user_attr("duration_s", round(time.time() - start, 3))
        raise _TrialFailed(str(e)) from e
    trial.set_user_attr("metrics", _json_safe(result))
    trial.set_user_attr("duration_s", round(time.time() - start, 3))
    return value


def _work(cfg: Config, study, storage, limit: int, trial_fn, *, grace_period: float,
          after_trial=None, orphaned=None) -> None:
    """Take trials until the study holds ``limit`` and none is running; the worker loop."""
    from optuna.trial import TrialState
    workdir = Path(cfg.tunnel.search.workdir)
    lock = _FileLock(workdir / "search.lock")
    alive = _Alive(workdir)

    def objective(trial):
        lock.release()  # the trial is taken: let the next worker count and ask
        return _run_one(trial, study, cfg, trial_fn, alive.info)

    try:
        while orphaned is None or not orphaned():
            lock.acquire()
            try:
                with _quiet():
                    _fail_ended(study, storage, grace_period)
                    import optuna
                    optuna.storages.fail_stale_trials(study)
                    groups = _groups(study.get_trials(deepcopy=False))
                    states = {t.state for t in groups.values()}
                    start = len(groups) < limit or TrialState.WAITING in states
                    if start:
                        study.optimize(objective, n_trials=1, catch=(_TrialFailed,),
                                       gc_after_trial=False)
            finally:
                lock.release()
            if start:
                if after_trial is not None:
                    after_trial(study)
            elif TrialState.RUNNING in states:
                time.sleep(min(5.0, grace_period / 4))  # a running trial may need a retry
            else:
                return
    finally:
        alive.close()


# -- local worker processes ---------------------------------------------------------------------

def worker_envs(parallel: int) -> tuple[list[dict], str]:
    """Each local worker's environment changes, and the devices in words. Counts the devices in
    a child process: starting JAX here would take the GPUs' memory from the workers."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend(), "
                               "jax.local_device_count())"],
        capture_output=True, text=True, timeout=600)
    if probe.returncode:
        raise RuntimeError(f"counting the devices failed: {probe.stderr[-2000:]}")
    backend, n = probe.stdout.split()[-2:]
    n = int(n)
    envs: list[dict] = [{} for _ in range(parallel)]
    if backend == "tpu":
        raise UserError("tunnel.search.parallel > 1 on TPU: one process owns a host's TPU chips; "
                        "use parallel=1 (a trial uses every chip), or run the search on several "
                        "hosts with a shared storage")
    if backend == "cpu" and n > 1:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", "")).strip()
        for env in envs:
            env.update(JAX_NUM_CPU_DEVICES=str(max(1, n // parallel)), XLA_FLAGS=flags)
    elif backend == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v for v in visible.split(",") if v.strip()][:n] if visible else \
            [str(i) for i in range(n)]
        if len(ids) >= parallel:
            per = len(ids) // parallel
            for i, env in enumerate(envs):
                env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i * per:(i + 1) * per])
        else:
            for i, env in enumerate(envs):
                env.update(CUDA_VISIBLE_DEVICES=ids[i % len(ids)],
                           XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return envs, f"{n} {backend} device{'s' if n > 1 else ''}"


def _worker_main(index: int, env: dict, cfg: Config, url: str, limit: int, trial_fn,
                 heartbeat_interval: int, grace_period: int, parent: int) -> None:
    os.environ.update(env)
    if "JAX_NUM_CPU_DEVICES" in env:  # before JAX starts a backend
        import jax
        jax.config.update("jax_num_cpu_devices", int(env["JAX_NUM_CPU_DEVICES"]))
    with contextlib.suppress(Exception):  # Linux: die with the parent, even on SIGKILL
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def interrupt(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupt)
    _quiet_optuna()
    try:
        storage = _open_storage(url, heartbeat_interval, grace_period)
        with _quiet():
            study = _load_study(cfg, storage, url, None)
            study.sampler = _sampler(cfg.tunnel.search, cfg.tunnel.search.seed, index,
                                     len(study.get_trials(deepcopy=False)))
        _work(cfg, study, storage, limit, trial_fn, grace_period=grace_period,
              orphaned=lambda: os.getppid() != parent)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_workers(cfg: Config, url: str, limit: int, trial_fn, study, reporter, *,
                 heartbeat_interval: int, grace_period: int) -> list[int]:
    """Run ``parallel`` worker processes to the end; their exit codes."""
    import multiprocessing
    sc = cfg.tunnel.search
    envs, devices = worker_envs(sc.parallel)
    reporter.say(f"{sc.parallel} worker processes on {devices}")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, name=f"mcpm-search-{i}",
                         args=(i, envs[i], cfg, url, limit, trial_fn,
                               heartbeat_interval, grace_period, os.getpid()))
             for i in range(sc.parallel)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            next(p for p in procs if p.is_alive()).join(timeout=2.0)
            reporter.update(study)
    except KeyboardInterrupt:
        # the workers got the terminal's Ctrl-C too; else ask them to stop, then insist
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        raise
    return [p.exitcode for p in procs]


# -- the API and the command --------------------------------------------------------------------

def run_search(cfg: Config, *, progress: bool = True, trial_fn=None,
               target_width: int | None = None, heartbeat_interval: int = 30,
               grace_period: int = 120) -> SearchResult:
    """Run (or resume, or join) the search ``cfg.tunnel.search`` describes.

    ``trial_fn``: ``run_trial``'s signature (the default); with ``parallel`` > 1 it must be
    importable by name (a module-level function). ``target_width``: also write
    ``best-widthN.yaml``, the best settings at that width under muP. A trial's worker is
    presumed gone ``grace_period`` s after its last heartbeat (every ``heartbeat_interval`` s).
    """
    sc = cfg.tunnel.search
    if not sc.params:
        raise UserError("tunnel.search.params is empty: name the settings to search, e.g. "
                        "params=[peak_lr,init_std]")
    if target_width:
        at_width(cfg, target_width)  # refuse a width that does not fit before any trial
    if trial_fn is None:
        from mcpm.tunnel.trial import run_trial as trial_fn
    workdir = Path(sc.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    url, limit = storage_url(sc), search_size(sc)
    _quiet_optuna()
    storage = _open_storage(url, heartbeat_interval, grace_period)
    with _quiet():
        study = _load_study(cfg, storage, url, None)
        study.sampler = _sampler(sc, sc.seed, 0, len(study.get_trials(deepcopy=False)))
    reporter = _Reporter(cfg, limit, progress, target_width)
    reporter.start(study)
    what = (f"grid of {limit} combinations" if sc.sampler == "grid" else f"{limit} TPE trials")
    reporter.say(f"mcpm tunnel search: study {sc.study!r} in {_redact(url)}: {what} of "
                 f"{', '.join(sc.params)} ({len(reporter.seen)} finished); {sc.steps} + "
                 f"{sc.decay_steps} steps each, by {sc.objective}; outputs in {workdir}")
    exit_codes: list[int] = []
    try:
        if sc.parallel == 1:
            _work(cfg, study, storage, limit, trial_fn, grace_period=grace_period,
                  after_trial=reporter.update)
        else:
            exit_codes = _run_workers(cfg, url, limit, trial_fn, study, reporter,
                                      heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period)
    except KeyboardInterrupt:
        reporter.update(study, final=True)
        reporter.close()
        print(f"mcpm tunnel search: stopped; run the same command to resume (an interrupted "
              f"trial runs again); results so far in {workdir / TABLE}", file=sys.stderr)
        raise
    reporter.update(study, final=True)
    reporter.close()

    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    groups = _groups(trials).values()
    complete = sum(t.state == TrialState.COMPLETE for t in groups)
    failed = sum(t.state == TrialState.FAIL for t in groups)
    if any(exit_codes):
        print(f"mcpm tunnel search: worker exit codes {exit_codes}; run the same command to "
              "finish the search", file=sys.stderr)
    best = _best(trials)
    if best is None:
        print(f"mcpm tunnel search: no trial completed ({failed} failed); see {workdir / TABLE}")
    else:
        print(f"{len(groups)} trials: {complete} complete, {failed} failed; top "
              f"{min(5, complete)}:\n{format_table(trials, list(sc.params))}\n"
              f"best: trial {best.number}, {sc.objective} {best.value:.4f}; config "
              f"{workdir / BEST} (mcpm train {workdir / BEST})")
    return SearchResult(
        best_params=dict(best.params) if best else None, best_value=best.value if best else None,
        best_number=best.number if best else None, table_path=workdir / TABLE,
        best_yaml=workdir / BEST if best else None, plots=reporter.plots, complete=complete,
        failed=failed, study=sc.study, storage=_redact(url))


def search_command(args) -> int:
    from mcpm.tunnel.cli import load_section_config

    cfg = load_section_config("search", args)
    result = run_search(cfg, target_width=getattr(args, "width", None))
    return 0 if result.best_params is not None else 1
