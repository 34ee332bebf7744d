"""The WSD schedule against its closed forms (training spec section 1), every decay shape."""
import math

import numpy as np
import pytest

from mcpm.config import ConfigError, ScheduleConfig, from_dict
from mcpm.train.schedule import decay_start_step, wsd_schedule


def closed_form(s, cfg, total, start):
    """Spec 1, written out per step."""
    peak, r, d = cfg.peak_lr, cfg.final_fraction, total - start
    if s < cfg.warmup_steps:
        return peak * s / cfg.warmup_steps
    if s < start:
        return peak
    x = min(s - start, d)
    if cfg.decay_shape == "exponential":
        return peak * 0.5 ** ((s - start) / cfg.half_life_steps)
    if cfg.decay_shape == "linear":
        return peak * (1 - (1 - r) * x / d)
    if cfg.decay_shape == "cosine":
        return peak * (r + (1 - r) * (1 + math.cos(math.pi * x / d)) / 2)
    return peak * (r + (1 - r) * (1 - math.sqrt(x / d)))


@pytest.mark.parametrize("shape", ["exponential", "linear", "cosine", "1-sqrt"])
def test_every_decay_shape_matches_its_closed_form(shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    total = int(rng.integers(200, 1000))
    cfg = ScheduleConfig(peak_lr=float(rng.uniform(1e-3, 1e-2)), warmup_steps=int(rng.integers(1, 50)),
                         decay_fraction=float(rng.uniform(0.05, 0.3)), decay_shape=shape,
                         half_life_steps=int(rng.integers(10, 100)),
                         final_fraction=float(rng.uniform(0, 0.2)))
    start = decay_start_step(total, cfg)
    assert start == total - round(cfg.decay_fraction * total)
    sched = wsd_schedule(cfg, total)
    steps = np.arange(total + 5)
    got = np.array([float(sched(s)) for s in steps])
    want = np.array([closed_form(int(s), cfg, total, start) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert got[start - 1] == pytest.approx(cfg.peak_lr)  # stable right up to the decay
    if shape != "exponential":
        assert got[total] == pytest.approx(cfg.final_fraction * cfg.peak_lr, rel=1e-5, abs=1e-9)


def test_branch_decay_starts_where_asked_and_jits():
    import jax
    cfg = ScheduleConfig(peak_lr=0.01, warmup_steps=10, decay_shape="linear", final_fraction=0.0)
    sched = jax.jit(wsd_schedule(cfg, total_steps=600, decay_start=500))
    assert float(sched(499)) == pytest.approx(0.01)
    assert float(sched(550)) == pytest.approx(0.005)
    assert float(sched(600)) == pytest.approx(0.0, abs=1e-9)


def test_no_warmup_and_bad_values():
    sched = wsd_schedule(ScheduleConfig(warmup_steps=0, decay_fraction=0.0), 100)
    assert float(sched(0)) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="decay_shape"):
        from_dict(ScheduleConfig, {"decay_shape": "step"})
    with pytest.raises(ConfigError, match="decay_fraction"):
        ScheduleConfig(decay_fraction=1.5)
