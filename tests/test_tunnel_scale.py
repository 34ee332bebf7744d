"""ModelTunnel sweeps on the real trainer and data pipeline (a small slice of the built-in
corpus): proxy widths under muP and SP, the trial, `scale` (resume, adding a width and a fork
step later) and `transfer`."""
import json
import math

import numpy as np
import pytest

from mcpm.config import ConfigError, load_config
from mcpm.train.optimizer import lr_multipliers
from mcpm.tunnel.proxy import at_width, hparams_of, non_embedding_params, with_hparams


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def small(cache, *extra):
    return load_config("configs/tunnel-tiny.yaml", [
        "model.vocab_size=512", "data.builtin_limit=40", "data.builtin_vocab_size=512",
        f"data.cache_dir={cache}", "data.batch_size=4", "data.seq_len=32",
        "train.eval_batches=2", "train.log_every=1", "train.schedule.warmup_steps=2",
        "train.peak_flops_per_device=1e11", "model.dim_model_base=32", *extra])


def test_proxy_widths_under_mup_and_sp(cache):
    cfg = small(cache)
    wide = at_width(cfg, 128)
    m = wide.model
    assert (m.hidden_size, m.num_attention_heads, m.num_key_value_heads,
            m.intermediate_size, m.head_dim) == (128, 4, 4, 320, 32)
    sp = at_width(cfg, 128, "sp").model
    # SP: no width multiplier (m = 1), the same fan-in init as muP at that width
    assert sp.width_mult == 1.0 and m.width_mult == 4.0
    assert math.isclose(sp.initializer_range, m.initializer_range / math.sqrt(m.width_mult))
    shapes = {"layers": {"q": np.zeros(1)}, "embed": np.zeros(1)}
    mup_lr = lr_multipliers(shapes, m, cfg.train.optimizer)
    sp_lr = lr_multipliers(shapes, sp, cfg.train.optimizer)
    assert mup_lr["layers"]["q"] == 0.25 and sp_lr["layers"]["q"] == 1.0
    # at the base width the two parametrisations are the same model
    base = int(cfg.model.dim_model_base)
    assert at_width(cfg, base, "sp").model == at_width(cfg, base, "mup").model
    assert non_embedding_params(wide) == m.num_params() - m.vocab_size * 128
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        at_width(cfg, 48)
    tuned = with_hparams(cfg, peak_lr=0.02, init_std=0.05, scale_emb=6, scale_depth=2,
                         batch_size=8)
    assert hparams_of(tuned) == {"peak_lr": 0.02, "init_std": 0.05, "scale_emb": 6.0,
                                 "scale_depth": 2.0, "batch_size": 8}


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_scale_resumes_and_adds_widths_and_forks_later(cache, tmp_path):
    from mcpm.tunnel.scale import run_scale
    lines = []
    first = small(cache, f"tunnel.scale.workdir={tmp_path}", "tunnel.scale.widths=[32]",
                  "tunnel.scale.decays=[4]", "tunnel.scale.decay_ratio=0.5")
    table = run_scale(first, progress=False, say=lines.append)
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    assert [(r["width"], r["decay_from"], r["decay_steps"], r["status"]) for r in rows] == [
        (32, 4, 2, "ok")]
    # D counts the branch's last step; N the parameters outside the embedding
    assert rows[0]["n_tokens"] == 6 * 4 * 32
    assert rows[0]["n_params"] == non_embedding_params(at_width(first, 32))
    branch = tmp_path / "w32" / "decay_from_4"
    summary = json.loads((branch / "summary.json").read_text())
    assert rows[0]["loss"] == summary["eval_loss"] and np.isfinite(rows[0]["loss"])
    before = _mtimes(tmp_path / "w32")
    # the same sweep again trains nothing
    run_scale(first, progress=False, say=lines.append)
    assert _mtimes(tmp_path / "w32") == before
    # a second fork step and a second width: only the new runs train
    more = small(cache, f"tunnel.scale.workdir={tmp_path}", "tunnel.scale.widths=[32,64]",
                 "tunnel.scale.decays=[4,8]", "tunnel.scale.decay_ratio=0.5")
    run_scale(more, progress=False, say=lines.append)
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    assert [(r["width"], r["decay_from"]) for r in rows] == [(32, 4), (32, 8), (64, 4), (64, 8)]
    assert all(r["status"] == "ok" for r in rows)
    after = _mtimes(tmp_path / "w32")
    assert all(after[p] == t for p, t in before.items() if branch in p.parents)
    # the main run went on from step 4 to 8 (not again from 0), keeping the fork checkpoints
    main_rows = [json.loads(x) for x in (tmp_path / "w32" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in main_rows] == list(range(1, 9))
    assert {4, 8} <= {int(p.name) for p in (tmp_path / "w32" / "checkpoints").iterdir()
                      if p.name.isdigit()}
    # a fork step the main run passed without a checkpoint there is refused, naming both
    from mcpm.tunnel.scale import ScaleError
    late = small(cache, f"tunnel.scale.workdir={tmp_path}", "tunnel.scale.widths=[32]",
                 "tunnel.scale.decays=[6]")
    with pytest.raises(ScaleError, match="already at step 8.*no checkpoint at 6"):
        run_scale(late, progress=False, say=lines.append)
    # another decay ratio in the same sweep is refused before anything trains
    other = small(cache, f"tunnel.scale.workdir={tmp_path}", "tunnel.scale.widths=[32]",
                  "tunnel.scale.decays=[4]", "tunnel.scale.decay_ratio=1.0")
    with pytest.raises(ScaleError, match="decayed for 2 steps, this sweep asks for 4"):
        run_scale(other, progress=False, say=lines.append)


def test_transfer_sweeps_parametrizations_and_resumes(cache, tmp_path):
    from mcpm.tunnel.transfer import run_transfer
    cfg = small(cache, f"tunnel.transfer.workdir={tmp_path}", "tunnel.transfer.widths=[32]",
                "tunnel.transfer.lrs=[0.005,0.02]", "tunnel.transfer.steps=3")
    table, png = run_transfer(cfg, say=lambda s: None)
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    assert [(r["parametrization"], r["lr"]) for r in rows] == [
        ("mup", 0.005), ("mup", 0.02), ("sp", 0.005), ("sp", 0.02)]
    assert png.is_file() and all(np.isfinite(r["loss"]) for r in rows)
    # width 32 is this config's base width: muP and SP are the same runs there
    by = {(r["parametrization"], r["lr"]): r["loss"] for r in rows}
    assert by["mup", 0.02] == by["sp", 0.02] and by["mup", 0.005] == by["sp", 0.005]
    assert [r.get("same_as") for r in rows] == [None, None, "mup", "mup"]  # trained once
    assert not (tmp_path / "sp").exists()
    before = _mtimes(tmp_path / "mup")
    run_transfer(cfg, say=lambda s: None)
    assert _mtimes(tmp_path / "mup") == before


def test_trial_is_a_stable_run_plus_a_branch_decay(cache, tmp_path):
    from mcpm.tunnel.trial import run_trial, trial_configs
    cfg = small(cache)
    stable, branch = trial_configs(cfg, tmp_path, steps=4, decay_steps=2)
    assert stable.train.schedule.decay_fraction == 0.0 and stable.train.steps == 4
    assert (branch.train.decay_from, branch.train.decay_steps) == (4, 2)
    out = run_trial(cfg, tmp_path, steps=4, decay_steps=2)
    assert out["objective"] == out["eval_loss"] and out["steps"] == 6
    assert out["branch_dir"] == str(tmp_path / "decay_from_4")
    rows = [json.loads(x) for x in (tmp_path / "decay_from_4" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["lr"] < cfg.train.schedule.peak_lr  # it decayed
    # a finished trial is read back, not trained again
    assert run_trial(cfg, tmp_path, steps=4, decay_steps=2)["objective"] == out["objective"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_stops_the_sweep(monkeypatch, sig):
    """train() saves and returns on Ctrl-C / SIGTERM; a sweep must stop, not go on to the
    runs that need the unfinished one (the branch needs its fork checkpoint)."""
    import mcpm.train.loop as loop
    from mcpm.cli import Terminated
    from mcpm.tunnel.trial import train_through
    monkeypatch.setattr(loop, "train", lambda cfg, progress=False: {
        "preempted": True, "signal": sig, "step": 3})
    with pytest.raises(Terminated if sig == "SIGTERM" else KeyboardInterrupt):
        train_through(load_config("configs/tunnel-tiny.yaml"))
