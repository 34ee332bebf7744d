"""Scaling-law and sigmoid fits (mcpm.tunnel.fit): recovery of known constants from noisy
synthetic data, the closed-form compute-optimal split, bootstrap intervals, input errors and
the ``mcpm tunnel fit`` command."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from mcpm.config import UserError
from mcpm.tunnel import fit as fit_mod
from mcpm.tunnel.fit import FitError, fit_command, fit_scaling_law, fit_sigmoid

# (A, alpha, B, beta, E): MiniCPM's exponents with amplitudes that give losses of 2.5-5 at the
# wind-tunnel scale, and Chinchilla's published constants
MINICPM_TRUE = (40.0, 0.29, 36.0, 0.23, 1.8)
CHINCHILLA_TRUE = (406.4, 0.34, 410.7, 0.28, 1.69)
# (N range of non-embedding params, D range of tokens)
SMALL = ((1e5, 3e6), (1e6, 3e7))     # what the tunnel's proxies measure
PAPER = ((4e7, 1.3e9), (1e9, 3e10))  # Chinchilla / MiniCPM model sizes
CASES = {"minicpm-small": (MINICPM_TRUE, SMALL), "chinchilla-small": (CHINCHILLA_TRUE, SMALL),
         "chinchilla-paper": (CHINCHILLA_TRUE, PAPER)}
NOISE = 0.002  # lognormal sigma: 0.2% scatter of each measured loss


def law(true, n, d):
    a, alpha, b, beta, e = true
    return a * np.asarray(n, float) ** -alpha + b * np.asarray(d, float) ** -beta + e


def synthetic(case, seed=0, sizes=6, counts=6):
    true, ((n_lo, n_hi), (d_lo, d_hi)) = CASES[case]
    n, d = np.meshgrid(np.geomspace(n_lo, n_hi, sizes), np.geomspace(d_lo, d_hi, counts),
                       indexing="ij")
    n, d = n.ravel(), d.ravel()
    rng = np.random.default_rng(seed)
    return n, d, law(true, n, d) * np.exp(rng.normal(0.0, NOISE, n.shape))


_FITS = {}


def fitted(case, form):
    """One fit per (case, form) for the module: the bootstrap caches ride along."""
    if (case, form) not in _FITS:
        _FITS[case, form] = fit_scaling_law(*synthetic(case), form=form)
    return _FITS[case, form]


@pytest.mark.parametrize("form", ["minicpm", "chinchilla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_recovers_known_constants(case, form):
    true, ((_, n_hi), (_, d_hi)) = CASES[case]
    fit = fitted(case, form)
    names = fit_mod.PARAM_NAMES[form]
    assert set(fit.params) == set(names)
    assert abs(fit.params["alpha"] - true[1]) < 0.02
    assert abs(fit.params["beta"] - true[3]) < 0.02
    # held out: a bigger model trained on more tokens than any measured point
    n_new, d_new = 2 * n_hi, 2 * d_hi
    assert fit.predict(n_new, d_new) == pytest.approx(law(true, n_new, d_new), rel=5e-3)
    assert fit.n_points == 36
    assert 0 < fit.residual < 3 * NOISE  # the fit's scatter is the noise's, no more


def test_predict_broadcasts_and_scalars_give_float():
    fit = fitted("minicpm-small", "minicpm")
    assert isinstance(fit.predict(1e6, 1e7), float)
    grid = fit.predict(np.array([1e5, 1e6, 1e7])[:, None], np.array([1e6, 1e8]))
    assert grid.shape == (3, 2)
    assert np.all(np.diff(grid, axis=0) < 0) and np.all(np.diff(grid, axis=1) < 0)
    json.dumps(fit.to_dict())  # JSON-able
    assert fit.to_dict()["form"] == "minicpm" and fit.to_dict()["n_points"] == 36


@pytest.mark.parametrize("case,form", [("minicpm-small", "minicpm"),
                                       ("chinchilla-paper", "chinchilla")])
def test_compute_optimal_matches_brute_force(case, form):
    from scipy.optimize import minimize_scalar

    fit = fitted(case, form)
    flops = np.array([1e15, 1e18, 1e22])
    n_opt, d_opt = fit.compute_optimal(flops)
    np.testing.assert_allclose(6 * n_opt * d_opt, flops, rtol=1e-10)
    for c, n_c in zip(flops, n_opt):
        res = minimize_scalar(lambda t: fit.predict(math.exp(t), c / (6 * math.exp(t))),
                              bounds=(math.log(10.0), math.log(c / 60)), method="bounded",
                              options={"xatol": 1e-8})
        assert math.exp(res.x) == pytest.approx(n_c, rel=1e-3)
    n1, d1 = fit.compute_optimal(1e20)
    assert isinstance(n1, float) and fit.tokens_per_param(1e20) == pytest.approx(d1 / n1)


def test_compute_optimal_tokens_per_param_grows_when_beta_is_smaller():
    # alpha > beta: the optimum puts more of a bigger budget into tokens
    fit = fitted("minicpm-small", "minicpm")
    assert fit.tokens_per_param(1e22) > fit.tokens_per_param(1e18)


@pytest.mark.parametrize("case,form", [("minicpm-small", "minicpm"),
                                       ("chinchilla-paper", "chinchilla")])
def test_intervals_contain_true_exponents(case, form):
    true = CASES[case][0]
    fit = fitted(case, form)
    wide = fit.interval(0.95, n_resamples=100)
    narrow = fit.interval(0.5, n_resamples=100)
    assert set(wide) == set(fit_mod.PARAM_NAMES[form])
    for name, (lo, hi) in wide.items():
        assert lo < hi
        assert wide[name][0] <= narrow[name][0] <= narrow[name][1] <= wide[name][1]
    for name, value in (("alpha", true[1]), ("beta", true[3])):
        lo, hi = wide[name]
        assert lo <= value <= hi, (name, value, lo, hi)
        assert hi - lo < 0.1  # informative, not a blanket range
    # cached: the same draws answer again
    assert fit.bootstrap(100) is fit.bootstrap(100)
    with pytest.raises(FitError, match="between 0 and 1"):
        fit.interval(1.5)


def test_sigmoid_recovers_constants():
    c, gamma, l, d = 0.65, -4.0, 2.4, 0.25
    loss = np.linspace(1.6, 3.2, 25)
    rng = np.random.default_rng(0)
    score = c / (1 + np.exp(-gamma * (loss - l))) + d + rng.normal(0, 0.005, loss.shape)
    sig = fit_sigmoid(loss, score)
    p = sig.params
    assert p["c"] == pytest.approx(c, abs=0.03)
    assert p["gamma"] == pytest.approx(gamma, rel=0.05)
    assert p["l"] == pytest.approx(l, abs=0.03)
    assert p["d"] == pytest.approx(d, abs=0.02)
    assert sig.n_points == 25 and sig.residual < 0.01
    pred = sig.predict(np.array([1.0, 2.4, 4.0]))
    assert pred.shape == (3,) and pred[0] > pred[1] > pred[2]
    assert isinstance(sig.predict(2.0), float)
    json.dumps(sig.to_dict())


def test_sigmoid_rising_score_keeps_c_positive():
    loss = np.linspace(1.0, 3.0, 15)
    score = 0.5 / (1 + np.exp(-3.0 * (loss - 2.0))) + 0.1
    p = fit_sigmoid(loss, score).params
    assert p["c"] == pytest.approx(0.5, abs=1e-3) and p["gamma"] == pytest.approx(3.0, rel=1e-2)


def _good():
    n, d, loss = synthetic("minicpm-small")
    return list(n), list(d), list(loss)


def _with(values, i, v):
    values = list(values)
    values[i] = v
    return values


BAD_SCALING = [
    ("lengths", lambda n, d, l: (n, d[:-1], l), {}, ["mismatched lengths", "n_tokens 35"]),
    ("few", lambda n, d, l: (n[:5], d[:5], l[:5]), {}, ["too few points", "at least 6", "got 5"]),
    ("few-chinchilla", lambda n, d, l: (n[:3], d[:3], l[:3]), {"form": "chinchilla"},
     ["too few points", "at least 6", "got 3"]),
    ("zero-n", lambda n, d, l: (_with(n, 4, 0.0), d, l), {}, ["n_params", "row 4", "positive"]),
    ("neg-d", lambda n, d, l: (n, _with(d, 7, -5.0), l), {}, ["n_tokens", "row 7", "-5"]),
    ("neg-loss", lambda n, d, l: (n, d, _with(_with(l, 9, -1.0), 12, -2.0)), {},
     ["loss", "row 9", "-1"]),
    ("nan", lambda n, d, l: (n, d, _with(l, 3, float("nan"))), {}, ["loss", "row 3", "nan"]),
    ("inf", lambda n, d, l: (_with(n, 11, float("inf")), d, l), {}, ["n_params", "row 11", "inf"]),
    ("same-n", lambda n, d, l: ([1e6] * len(n), d, l), {}, ["all n_params are equal", "alpha",
                                                            "not identifiable"]),
    ("same-d", lambda n, d, l: (n, [1e7] * len(d), l), {"form": "chinchilla"},
     ["all n_tokens are equal", "beta"]),
    ("form", lambda n, d, l: (n, d, l), {"form": "kaplan"}, ["unknown", "kaplan", "minicpm",
                                                             "chinchilla"]),
    ("shape", lambda n, d, l: (np.ones((6, 6)), d, l), {}, ["1-D"]),
    ("text", lambda n, d, l: (["a"] * len(n), d, l), {}, ["must be numbers"]),
]


@pytest.mark.parametrize("name,mutate,kwargs,words", BAD_SCALING, ids=[c[0] for c in BAD_SCALING])
def test_bad_scaling_input_raises(name, mutate, kwargs, words):
    with pytest.raises(FitError) as info:
        fit_scaling_law(*mutate(*_good()), **kwargs)
    for word in words:
        assert word.lower() in str(info.value).lower(), (word, str(info.value))
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("form", ["minicpm", "chinchilla"])
def test_loss_that_does_not_fall_is_a_fit_error(form):
    n, d, _ = synthetic("minicpm-small")
    loss = 2.0 + 0.1 * np.log(n) + 30 * d ** -0.3  # rises with N
    with pytest.raises(FitError, match="did not converge.*alpha"):
        fit_scaling_law(n, d, loss, form)


def test_failed_optimiser_is_a_fit_error(monkeypatch):
    import scipy.optimize as so

    def failing(fun, x0, **kw):
        return type("R", (), {"status": 0, "cost": float("nan"), "x": x0, "fun": float("nan"),
                              "nit": 0})()

    monkeypatch.setattr(so, "least_squares", failing)
    monkeypatch.setattr(so, "minimize", failing)
    for form in ("minicpm", "chinchilla"):
        with pytest.raises(FitError, match=f"{form} fit did not converge from any"):
            fit_scaling_law(*_good(), form=form)
    monkeypatch.setattr(so, "curve_fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError()))
    with pytest.raises(FitError, match="sigmoid fit did not converge"):
        fit_sigmoid(np.linspace(1, 3, 8), np.linspace(0.9, 0.2, 8))


@pytest.mark.parametrize("loss,score,words", [
    ([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], ["too few points", "at least 5", "got 4"]),
    ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3], ["mismatched lengths"]),
    ([1, 2, 3, float("nan"), 5], [0.5, 0.4, 0.3, 0.2, 0.1], ["loss", "row 3"]),
    ([1, 2, 3, 4, 5], [0.5, 0.4, float("inf"), 0.2, 0.1], ["score", "row 2"]),
    ([2, 2, 2, 2, 2], [0.5, 0.4, 0.3, 0.2, 0.1], ["all loss values are equal"]),
    ([1, 2, 3, 4, 5], [0.3] * 5, ["all score values are equal"]),
])
def test_bad_sigmoid_input_raises(loss, score, words):
    with pytest.raises(FitError) as info:
        fit_sigmoid(loss, score)
    for word in words:
        assert word.lower() in str(info.value).lower(), (word, str(info.value))


def _args(results, out="", form="both", level=0.9):
    return argparse.Namespace(results=str(results), form=form, level=level, out=str(out))


def _write_table(path, extra_rows=()):
    n, d, loss = synthetic("minicpm-small", sizes=5, counts=4)
    rows = [{"n_params": float(a), "n_tokens": float(b), "loss": float(c), "width": 64,
             "status": "ok"} for a, b, c in zip(n, d, loss)]
    rows += list(extra_rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return len(n)


def test_fit_command_writes_report_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fit_mod, "BOOTSTRAP_RESAMPLES", 50)
    # a failed run's row is skipped, even with a nonsense loss
    count = _write_table(tmp_path / "scaling.jsonl",
                         [{"n_params": 1e5, "n_tokens": 1e6, "loss": -1, "status": "failed"}])
    out = tmp_path / "plots"
    assert fit_command(_args(tmp_path, out)) == 0  # a workdir: reads its scaling.jsonl
    report = json.loads((out / "fit.json").read_text())
    assert report["n_points"] == count and set(report["fits"]) == {"minicpm", "chinchilla"}
    for form, entry in report["fits"].items():
        assert set(entry["intervals"]) == set(fit_mod.PARAM_NAMES[form])
        assert len(entry["compute_optimal"]) == 3
        first = entry["compute_optimal"][0]
        assert first["tokens_per_param"] == pytest.approx(first["n_tokens"] / first["n_params"])
        assert abs(entry["params"]["alpha"] - MINICPM_TRUE[1]) < 0.05
    for name in ("fit_curves.png", "fit_isoloss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    text = capsys.readouterr().out
    assert "alpha" in text and "tokens/param" in text and "90% interval" in text

    # a file with one form, outputs beside the file
    assert fit_command(_args(tmp_path / "scaling.jsonl", form="minicpm")) == 0
    report = json.loads((tmp_path / "fit.json").read_text())
    assert list(report["fits"]) == ["minicpm"]
    assert (tmp_path / "fit_curves.png").exists() and (tmp_path / "fit_isoloss.png").exists()


@pytest.mark.parametrize("content,words", [
    ('{"n_params": 1e5, "n_tokens": 1e6, "loss": 3.0}\n{"n_params": 2e5,\n', ["line 2",
                                                                               "not valid JSON"]),
    ('{"n_params": 1e5, "n_tokens": 1e6, "loss": 3.0}\n{"n_params": 2e5, "loss": 3.0}\n',
     ["line 2", "'n_tokens'"]),
    ('{"n_params": 1e5, "n_tokens": 1e6, "loss": "x"}\n', ["line 1", "loss", "not a number"]),
    ('[1, 2, 3]\n', ["line 1", "not a JSON object"]),
])
def test_fit_command_bad_files(tmp_path, content, words):
    path = tmp_path / "scaling.jsonl"
    path.write_text(content)
    with pytest.raises(FitError) as info:
        fit_command(_args(path))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_fit_command_missing_file_and_bad_values(tmp_path):
    with pytest.raises(FitError, match="does not exist"):
        fit_command(_args(tmp_path / "nope.jsonl"))
    with pytest.raises(FitError, match="does not exist"):
        fit_command(_args(tmp_path))  # a folder without scaling.jsonl
    _write_table(tmp_path / "scaling.jsonl",
                 [{"n_params": 1e5, "n_tokens": 0, "loss": 3.0}])
    # the offending value is named by its line in the file
    with pytest.raises(FitError, match="n_tokens at line 21 is 0"):
        fit_command(_args(tmp_path))
    _write_table(tmp_path / "scaling.jsonl")
    with pytest.raises(FitError, match="--level"):
        fit_command(_args(tmp_path, level=90))


def test_plot_fits_draws_the_held_out_point(tmp_path):
    from mcpm.tunnel.fit import plot_fits
    rng = np.random.default_rng(3)
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e5, 3e6, 4), np.geomspace(1e6, 3e7, 3)))
    loss = (50 * n ** -0.29 + 80 * d ** -0.23 + 1.5) * np.exp(rng.normal(0, 0.002, n.size))
    fit = fit_scaling_law(n, d, loss, form="minicpm")
    plain = [p.read_bytes() for p in plot_fits([fit], n, d, loss, tmp_path / "a")]
    again = [p.read_bytes() for p in plot_fits([fit], n, d, loss, tmp_path / "b")]
    marked = [p.read_bytes() for p in plot_fits({"minicpm": fit}, n, d, loss, tmp_path / "c",
                                                held_out=(6e6, 5e7, 3.4))]
    assert plain == again  # the drawing is deterministic, so a difference is the point
    assert all(m != p for m, p in zip(marked, plain))
    assert not [f for f in (tmp_path / "c").iterdir() if f.name.startswith(".")]
