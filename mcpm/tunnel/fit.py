"""Scaling-law fits (training spec section 2): loss against parameters N and tokens D, and the
downstream score against the loss.

Two forms of ``L(N, D)`` are fitted to an (N, D, loss) table:

* ``minicpm``: ``L = C_N N^-alpha + C_D D^-beta + L0`` (MiniCPM's data-model law; the paper
  reports alpha 0.29, beta 0.23). Fitted with ``scipy.optimize.least_squares`` on the squared
  error in log L, with the positive constants (C_N, C_D, L0) log-parameterised, from a small
  grid of starting points built from the data.
* ``chinchilla``: ``L = A N^-alpha + B D^-beta + E``, fitted as Chinchilla did: the Huber loss
  (delta 1e-3) between log L and ``logsumexp(a - alpha log N, b - beta log D, e)`` with
  A = exp a, B = exp b, E = exp e, minimised with L-BFGS-B. Chinchilla started L-BFGS from
  every point of a grid over alpha, beta, a, b, e; here the whole grid is scored at once and
  only its best points (the best one per (alpha, beta) pair) are refined, which finds the same
  minimum for a fraction of the cost.

The functional form is the same; the forms differ in the objective (squared against Huber, so
the second is less swayed by an outlying run) and in the starts. From either fit the
compute-optimal split under ``C = 6 N D`` follows in closed form:
``N_opt = G (C/6)^(beta/(alpha+beta))``, ``D_opt = G^-1 (C/6)^(alpha/(alpha+beta))`` with
``G = (alpha A / (beta B))^(1/(alpha+beta))``. Parameter intervals come from a percentile
bootstrap over the measured points.

``fit_sigmoid`` fits ModelTunnel v2's link from an indicator loss to a downstream score,
``score = c / (1 + exp(-gamma (loss - l))) + d``, with ``scipy.optimize.curve_fit``.

``fit_command`` is ``mcpm tunnel fit``: it reads the table that ``mcpm tunnel scale`` writes,
prints the constants with intervals and the compute-optimal split, and writes ``fit.json``,
``fit_curves.png`` and ``fit_isoloss.png``.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np

from mcpm._files import atomic_write, write_json
from mcpm.config import UserError

FORMS = ("minicpm", "chinchilla")
PARAM_NAMES = {"minicpm": ("C_N", "alpha", "C_D", "beta", "L0"),
               "chinchilla": ("A", "alpha", "B", "beta", "E")}
SIGMOID_NAMES = ("c", "gamma", "l", "d")
MIN_POINTS = {"minicpm": 6, "chinchilla": 6, "sigmoid": 5}
HUBER_DELTA = 1e-3
BOOTSTRAP_RESAMPLES = 200  # what `mcpm tunnel fit` draws for its intervals
# a fitted exponent this small means the loss did not fall with N (or D) at all
_MIN_EXPONENT = 1e-3
_MAX_EXPONENT = 10.0


class FitError(UserError):
    """A fit's input is unusable (lengths, too few points, bad values) or the fit failed."""


@functools.lru_cache(maxsize=1)
def _scipy_openblas():
    """(get, set) thread-count functions of scipy's bundled OpenBLAS, or None."""
    try:
        import scipy

        libs = sorted(Path(scipy.__file__).resolve().parent.parent.glob(
            "scipy.libs/libscipy_openblas*.so*"))
        if not libs:
            return None
        lib = ctypes.CDLL(str(libs[0]))  # already loaded by scipy: the same handle
        get, put = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
    except (OSError, AttributeError):
        return None
    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, put


@contextlib.contextmanager
def _one_blas_thread():
    """Runs the block with scipy's BLAS on one thread. The optimisers here call BLAS on 5 x 5
    problems thousands of times, and waking OpenBLAS's worker threads for each call made a
    bootstrap about ten times slower on a busy machine. threadpoolctl when installed, else
    scipy's bundled OpenBLAS directly; neither found, nothing changes."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            yield
        return
    funcs = _scipy_openblas()
    if funcs is None:
        yield
        return
    get, put = funcs
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


# ---------------------------------------------------------------------------------------------
# input checks


def _as_vector(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FitError(f"{name} must be numbers: {e}") from None
    if arr.ndim != 1:
        raise FitError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def _row_name(rows, i: int) -> str:
    return rows[i] if rows is not None else f"row {i}"


def _check_columns(columns: dict, need: int, what: str, positive: tuple = (), rows=None):
    """Arrays of ``columns`` checked for equal length, enough points and finite values (and
    positive ones for the names in ``positive``); ``rows`` names the points in messages."""
    arrays = {name: _as_vector(v, name) for name, v in columns.items()}
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise FitError(f"{what}: the inputs have mismatched lengths: "
                       + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    n = next(iter(lengths.values()))
    if n < need:
        raise FitError(f"{what}: too few points: needs at least {need} (more than the "
                       f"{need - 1} free parameters), got {n}")
    for name, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            i = int(bad[0])
            raise FitError(f"{what}: {name} at {_row_name(rows, i)} is {arr[i]} (NaN or inf); "
                           "every value must be finite")
    for name in positive:
        bad = np.flatnonzero(arrays[name] <= 0)
        if bad.size:
            i = int(bad[0])
            raise FitError(f"{what}: {name} at {_row_name(rows, i)} is {arrays[name][i]:g}; "
                           f"{name} must be positive")
    return arrays


def _check_scaling_input(n_params, n_tokens, loss, form, rows=None):
    if form not in FORMS:
        raise FitError(f"unknown scaling-law form {form!r}; valid forms: {', '.join(FORMS)}")
    cols = _check_columns({"n_params": n_params, "n_tokens": n_tokens, "loss": loss},
                          MIN_POINTS[form], f"{form} fit",
                          positive=("n_params", "n_tokens", "loss"), rows=rows)
    for name, exponent in (("n_params", "alpha"), ("n_tokens", "beta")):
        if np.ptp(cols[name]) == 0:
            raise FitError(f"{form} fit: all {name} are equal ({cols[name][0]:g}), so the "
                           f"exponent {exponent} is not identifiable; measure at least two "
                           f"values of {name}")
    return cols["n_params"], cols["n_tokens"], cols["loss"]


# ---------------------------------------------------------------------------------------------
# the two L(N, D) fits, in centred coordinates: x = log N - x0, y = log D - y0 with x0, y0 the
# mean logs. The term amplitudes at the centre then sit near the loss itself and hardly move
# with the exponents, which conditions the problem far better than raw log C_N does.


def _centre(n, d):
    ln, ld = np.log(n), np.log(d)
    x0, y0 = float(ln.mean()), float(ld.mean())
    return ln - x0, ld - y0, x0, y0


def _to_raw(theta, x0, y0):
    """Centred (log amplitude at centre, alpha, ..., log L0) -> raw log constants."""
    cn, alpha, cd, beta, l0 = theta
    return np.array([cn + alpha * x0, alpha, cd + beta * y0, beta, l0])


def _to_centred(raw, x0, y0):
    a, alpha, b, beta, e = raw
    return np.array([a - alpha * x0, alpha, b - beta * y0, beta, e])


def _terms(theta, x, y):
    cn, alpha, cd, beta, l0 = theta
    return np.stack([cn - alpha * x, cd - beta * y, np.full_like(x, l0)])


def _fit_minicpm(x, y, logl, starts):
    from scipy.optimize import least_squares

    # Squared error in log L: the noise of a measured loss is multiplicative (the same relative
    # scatter at 4.0 as at 2.5), and log L weights the small models' large losses no more than
    # the big models' small ones, which are the points that matter for extrapolation.
    def residual(theta):
        u = _terms(theta, x, y)
        return np.logaddexp.reduce(u, axis=0) - logl

    def jacobian(theta):
        u = _terms(theta, x, y)
        w = np.exp(u - np.logaddexp.reduce(u, axis=0))  # each term's share of the prediction
        return np.stack([w[0], -w[0] * x, w[1], -w[1] * y, w[2]], axis=1)

    lo = [-np.inf, 0.0, -np.inf, 0.0, -np.inf]
    hi = [np.inf, _MAX_EXPONENT, np.inf, _MAX_EXPONENT, np.inf]
    best = None
    for start in starts:
        start = np.clip(start, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
        try:
            res = least_squares(residual, start, jac=jacobian, bounds=(lo, hi), method="trf",
                                x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                max_nfev=2000)
        except (ValueError, FloatingPointError):
            continue
        if res.status > 0 and np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    return None if best is None else best.x


def _huber_objective(theta, x, y, logl):
    u = _terms(theta, x, y)
    m = np.logaddexp.reduce(u, axis=0)
    r = m - logl
    small = np.abs(r) <= HUBER_DELTA
    f = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    g = np.where(small, r, HUBER_DELTA * np.sign(r))
    w = np.exp(u - m)
    grad = np.array([(g * w[0]).sum(), -(g * w[0] * x).sum(), (g * w[1]).sum(),
                     -(g * w[1] * y).sum(), (g * w[2]).sum()])
    # scaled so the objective is O(1): L-BFGS-B's stopping tolerance is relative to max(|f|, 1)
    scale = 1.0 / (HUBER_DELTA * len(r))
    return f * scale, grad * scale


def _chinchilla_grid(logn, logd, logl, keep: int):
    """Chinchilla's grid of starts (raw a, b, e), the ``keep`` with the lowest Huber loss."""
    exps = np.arange(0.0, 2.01, 0.5)
    amps = np.arange(0.0, 25.1, 5.0)
    es = np.arange(-1.0, 1.51, 0.5)
    a, alpha, b, beta, e = (g.ravel() for g in np.meshgrid(amps, exps, amps, exps, es,
                                                           indexing="ij"))
    u = np.stack([a[:, None] - alpha[:, None] * logn, b[:, None] - beta[:, None] * logd,
                  np.broadcast_to(e[:, None], (len(e), len(logn)))])
    r = np.logaddexp.reduce(u, axis=0) - logl
    h = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r * r,
                 HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(axis=1)
    # the best point of each (alpha, beta) pair, so the starts spread over the exponents
    # instead of crowding into one basin
    pair = np.round(alpha * 2).astype(int) * 10 + np.round(beta * 2).astype(int)
    order = np.lexsort((h, pair))
    first = order[np.r_[True, pair[order][1:] != pair[order][:-1]]]
    chosen = first[np.argsort(h[first])][:keep]
    return np.stack([a, alpha, b, beta, e], axis=1)[chosen]


def _fit_chinchilla(x, y, logl, starts):
    from scipy.optimize import minimize

    bounds = [(None, None), (0.0, _MAX_EXPONENT), (None, None), (0.0, _MAX_EXPONENT),
              (None, None)]
    best = None
    for start in starts:
        with np.errstate(over="ignore", invalid="ignore"):
            res = minimize(_huber_objective, start, args=(x, y, logl), jac=True,
                           method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10})
        # a line search that stops at the objective's floating-point floor still converged:
        # what counts is a finite minimum, the best of the starts
        if np.isfinite(res.fun) and np.all(np.isfinite(res.x)) and res.nit > 0 \
                and (best is None or res.fun < best.fun):
            best = res
    return None if best is None else best.x


def _minicpm_starts(logl):
    # amplitudes at the centre split the excess over L0 evenly between the two terms
    lmin, lmean = float(np.exp(logl.min())), float(np.exp(logl.mean()))
    starts = []
    for frac in (0.2, 0.5, 0.85):
        l0 = frac * lmin
        amp = math.log(max(lmean - l0, 1e-6) / 2)
        for alpha in (0.15, 0.35, 0.7):
            for beta in (0.15, 0.35, 0.7):
                starts.append(np.array([amp, alpha, amp, beta, math.log(l0)]))
    return starts


def _run_fit(form, x, y, logl, starts):
    """Centred parameters of the best fit from ``starts`` (centred), or None."""
    with _one_blas_thread():
        if form == "minicpm":
            return _fit_minicpm(x, y, logl, starts)
        return _fit_chinchilla(x, y, logl, starts)


def _full_fit(form, n, d, loss):
    x, y, x0, y0 = _centre(n, d)
    logl = np.log(loss)
    if form == "minicpm":
        starts = _minicpm_starts(logl)
    else:
        starts = [_to_centred(s, x0, y0) for s in
                  _chinchilla_grid(x + x0, y + y0, logl, keep=10)]
    theta = _run_fit(form, x, y, logl, starts)
    if theta is None:
        raise FitError(f"{form} fit did not converge from any of its {len(starts)} starting "
                       "points")
    return _to_raw(theta, x0, y0)


@dataclasses.dataclass
class ScalingFit:
    """A fitted ``L(N, D) = A N^-alpha + B D^-beta + E`` (named C_N, C_D, L0 for minicpm)."""
    form: str
    params: dict
    n_points: int
    residual: float  # RMS of (predicted / measured - 1) over the fitted points
    _data: tuple = dataclasses.field(default=(), repr=False, compare=False)
    _boot: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def _constants(self):
        a_name, _, b_name, _, e_name = PARAM_NAMES[self.form]
        p = self.params
        return p[a_name], p["alpha"], p[b_name], p["beta"], p[e_name]

    def predict(self, n_params, n_tokens):
        """Predicted loss, broadcasting over ``n_params`` and ``n_tokens``."""
        a, alpha, b, beta, e = self._constants()
        n, d = np.asarray(n_params, dtype=np.float64), np.asarray(n_tokens, dtype=np.float64)
        out = a * n ** -alpha + b * d ** -beta + e
        return float(out) if np.ndim(out) == 0 else out

    def compute_optimal(self, flops):
        """``(N, D)`` minimising the predicted loss at ``6 N D = flops`` (scalars or arrays)."""
        a, alpha, b, beta, _ = self._constants()
        k = np.log(np.asarray(flops, dtype=np.float64) / 6.0)
        # logs throughout: G and (C/6)^... overflow float64 for Chinchilla-sized constants
        log_g = (math.log(alpha * a) - math.log(beta * b)) / (alpha + beta)
        log_n = log_g + k * beta / (alpha + beta)
        log_d = -log_g + k * alpha / (alpha + beta)
        n, d = np.exp(log_n), np.exp(log_d)
        return (float(n), float(d)) if np.ndim(n) == 0 else (n, d)

    def tokens_per_param(self, flops):
        """``D_opt / N_opt`` at ``flops``."""
        n, d = self.compute_optimal(flops)
        return d / n

    def bootstrap(self, n_resamples: int = 200, seed: int = 0) -> np.ndarray:
        """Refitted parameters (rows, in ``params`` order) over resamples of the points drawn
        with replacement; each refit starts from the full fit. Cached per (count, seed)."""
        key = (int(n_resamples), int(seed))
        if key in self._boot:
            return self._boot[key]
        n, d, loss = self._data
        names = PARAM_NAMES[self.form]
        raw_full = np.array([math.log(self.params[names[0]]), self.params["alpha"],
                             math.log(self.params[names[2]]), self.params["beta"],
                             math.log(self.params[names[4]])])
        rng = np.random.default_rng(seed)
        rows = []
        with _one_blas_thread():
            for _ in range(n_resamples):
                idx = rng.integers(0, len(n), len(n))
                if np.ptp(n[idx]) == 0 or np.ptp(d[idx]) == 0:
                    continue  # a resample with one N (or D) says nothing about its exponent
                x, y, x0, y0 = _centre(n[idx], d[idx])
                theta = _run_fit(self.form, x, y, np.log(loss[idx]),
                                 [_to_centred(raw_full, x0, y0)])
                if theta is not None:
                    raw = _to_raw(theta, x0, y0)
                    rows.append([math.exp(raw[0]), raw[1], math.exp(raw[2]), raw[3],
                                 math.exp(raw[4])])
        if len(rows) < max(10, n_resamples // 2):
            raise FitError(f"{self.form} bootstrap: only {len(rows)} of {n_resamples} "
                           "resamples could be refitted")
        self._boot[key] = np.array(rows)
        return self._boot[key]

    def interval(self, level: float = 0.9, n_resamples: int = 200, seed: int = 0) -> dict:
        """Percentile bootstrap intervals ``{name: (lo, hi)}`` of every parameter."""
        if not 0.0 < level < 1.0:
            raise FitError(f"interval level must be between 0 and 1, got {level}")
        samples = self.bootstrap(n_resamples, seed)
        q = [50 * (1 - level), 50 * (1 + level)]
        return {name: tuple(float(v) for v in np.percentile(samples[:, i], q))
                for i, name in enumerate(PARAM_NAMES[self.form])}

    def to_dict(self) -> dict:
        return {"form": self.form, "params": {k: float(v) for k, v in self.params.items()},
                "n_points": int(self.n_points), "residual": float(self.residual)}


def fit_scaling_law(n_params, n_tokens, loss, form: str = "minicpm", *, rows=None) -> ScalingFit:
    """Fit ``L(N, D)`` of ``form`` ("minicpm" or "chinchilla") to the measured points.

    ``rows`` optionally names the points (e.g. file lines) for error messages."""
    n, d, loss = _check_scaling_input(n_params, n_tokens, loss, form, rows)
    raw = _full_fit(form, n, d, loss)
    names = PARAM_NAMES[form]
    for i, (name, var) in ((1, ("alpha", "n_params")), (3, ("beta", "n_tokens"))):
        if raw[i] < _MIN_EXPONENT or raw[i] > _MAX_EXPONENT - 1e-6:
            raise FitError(f"{form} fit did not converge to a power law: fitted {name} = "
                           f"{raw[i]:.3f}, at its bound; the loss does not fall with {var} "
                           "as the form assumes (check the runs)")
    params = {names[0]: math.exp(raw[0]), "alpha": float(raw[1]), names[2]: math.exp(raw[2]),
              "beta": float(raw[3]), names[4]: math.exp(raw[4])}
    fit = ScalingFit(form, params, len(n), 0.0, _data=(n, d, loss))
    fit.residual = float(np.sqrt(np.mean((fit.predict(n, d) / loss - 1.0) ** 2)))
    return fit


# ---------------------------------------------------------------------------------------------
# loss -> downstream score


def _sigmoid(loss, c, gamma, l, d):
    return c / (1.0 + np.exp(-gamma * (loss - l))) + d


@dataclasses.dataclass
class SigmoidFit:
    """``score = c / (1 + exp(-gamma (loss - l))) + d`` with c > 0 (the form is symmetric
    under c, gamma, d -> -c, -gamma, d + c; c > 0 picks one), so gamma < 0 when the score
    falls as the loss rises."""
    form: str
    params: dict
    n_points: int
    residual: float  # RMS of (predicted - measured) in score units: scores may be 0

    def predict(self, loss):
        p = self.params
        with np.errstate(over="ignore"):
            out = _sigmoid(np.asarray(loss, dtype=np.float64), p["c"], p["gamma"], p["l"],
                           p["d"])
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict:
        return {"form": self.form, "params": {k: float(v) for k, v in self.params.items()},
                "n_points": int(self.n_points), "residual": float(self.residual)}


def fit_sigmoid(loss, score) -> SigmoidFit:
    """Fit the score-from-loss sigmoid with ``scipy.optimize.curve_fit`` from several starts."""
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    cols = _check_columns({"loss": loss, "score": score}, MIN_POINTS["sigmoid"], "sigmoid fit")
    x, s = cols["loss"], cols["score"]
    for name, arr in (("loss", x), ("score", s)):
        if np.ptp(arr) == 0:
            raise FitError(f"sigmoid fit: all {name} values are equal ({arr[0]:g}); the curve "
                           "is not identifiable")
    span = float(np.ptp(x))
    best, best_sse = None, np.inf
    # gamma's sign is tried both ways (with c > 0 a falling score needs gamma < 0) and its
    # size from a gentle slope over the measured losses to a near step
    starts = [[float(np.ptp(s)), sign * steep / span, l_start, float(s.min())]
              for sign in (-1.0, 1.0) for steep in (2.0, 5.0, 15.0)
              for l_start in (float(np.median(x)), float(x.mean()))]
    with _one_blas_thread(), warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)
        for p0 in starts:
            try:
                p, _ = curve_fit(_sigmoid, x, s, p0=p0, maxfev=5000)
            except (RuntimeError, ValueError):
                continue
            sse = float(np.sum((_sigmoid(x, *p) - s) ** 2)) if np.all(np.isfinite(p)) \
                else np.inf
            if sse < best_sse:
                best, best_sse = p, sse
    if best is None or not np.isfinite(best_sse):
        raise FitError("sigmoid fit did not converge from any starting point")
    c, gamma, l, d = (float(v) for v in best)
    if c < 0:
        c, gamma, d = -c, -gamma, d + c
    return SigmoidFit("sigmoid", {"c": c, "gamma": gamma, "l": l, "d": d}, len(x),
                      math.sqrt(best_sse / len(x)))


# ---------------------------------------------------------------------------------------------
# `mcpm tunnel fit`


def read_results(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(n_params, n_tokens, loss, row names) from a JSONL table or a folder with
    ``scaling.jsonl``; rows whose ``status`` is not "ok" are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "scaling.jsonl"
    if not path.is_file():
        raise FitError(f"results file {path} does not exist (give the JSONL table that "
                       "`mcpm tunnel scale` writes, or its workdir)")
    cols = {"n_params": [], "n_tokens": [], "loss": []}
    names = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FitError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FitError(f"{path}: line {lineno} is not a JSON object")
            if row.get("status", "ok") != "ok":
                continue
            for key in cols:
                if key not in row:
                    raise FitError(f"{path}: the row at line {lineno} has no {key!r} key "
                                   f"(each row needs {', '.join(cols)})")
                try:
                    cols[key].append(float(row[key]))
                except (TypeError, ValueError):
                    raise FitError(f"{path}: line {lineno}: {key} is {row[key]!r}, not a "
                                   "number") from None
            names.append(f"line {lineno}")
    return (np.array(cols["n_params"]), np.array(cols["n_tokens"]), np.array(cols["loss"]),
            names)


def plot_fits(fits, n, d, loss, out_dir, *, held_out=None) -> tuple[Path, Path]:
    """``fit_curves.png`` and ``fit_isoloss.png`` in ``out_dir`` for a list (or dict) of fits
    to the points (n, d, loss); ``held_out`` = (N, D, measured loss) of a point that was not
    fitted, drawn as a star beside its prediction."""
    fits = list(fits.values()) if isinstance(fits, dict) else list(fits)
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    out = Path(out_dir)
    _plot_curves(fits, n, d, loss, out / "fit_curves.png", held_out)
    _plot_isoloss(fits, n, d, out / "fit_isoloss.png", held_out)
    return out / "fit_curves.png", out / "fit_isoloss.png"


def _plot_curves(fits, n, d, loss, path: Path, held_out=None) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(5.5 * len(fits), 4.2), layout="constrained")
    sizes = np.unique(n)
    colors = [f"C{i % 10}" for i in range(len(sizes))]
    dd = np.geomspace(d.min() / 2, d.max() * 4, 200)
    for k, fit in enumerate(fits):
        ax = fig.add_subplot(1, len(fits), k + 1)
        for size, color in zip(sizes, colors):
            sel = n == size
            ax.scatter(d[sel], loss[sel], color=color, s=18, label=f"N = {size:.3g}")
            ax.plot(dd, fit.predict(size, dd), color=color, lw=1.2)
        if held_out is not None:
            hn, hd, hl = held_out
            ax.plot(dd, fit.predict(hn, dd), color="k", lw=1.2, ls="--",
                    label=f"N = {hn:.3g} (predicted)")
            ax.scatter([hd], [hl], marker="*", s=140, color="k", zorder=5,
                       label="held-out model (measured)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide
        ax.set_xlabel("tokens D")
        ax.set_ylabel("loss")
        p = fit.params
        ax.set_title(f"{fit.form}: alpha {p['alpha']:.3f}, beta {p['beta']:.3f}")
        ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _plot_isoloss(fits, n, d, path: Path, held_out=None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(fits), 4.6), layout="constrained")
    nn = np.geomspace(n.min() / 3, n.max() * 30, 160)
    dd = np.geomspace(d.min() / 3, d.max() * 30, 160)
    gn, gd = np.meshgrid(nn, dd)
    flops = np.geomspace(6 * nn[0] * dd[0], 6 * nn[-1] * dd[-1], 100)
    for k, fit in enumerate(fits):
        ax = fig.add_subplot(1, len(fits), k + 1)
        surface = fit.predict(gn, gd)
        levels = np.unique(np.quantile(surface, np.linspace(0.02, 0.98, 14)))
        cs = ax.contour(gn, gd, surface, levels=levels, cmap="viridis", linewidths=0.9)
        ax.clabel(cs, fontsize=6, fmt="%.2f")
        on, od = fit.compute_optimal(flops)
        keep = (on >= nn[0]) & (on <= nn[-1]) & (od >= dd[0]) & (od <= dd[-1])
        ax.plot(on[keep], od[keep], color="crimson", lw=1.6, label="compute-optimal")
        ax.scatter(n, d, color="k", s=12, label="measured")
        if held_out is not None:
            ax.scatter([held_out[0]], [held_out[1]], marker="*", s=140, color="crimson",
                       zorder=5, label="held-out model")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("tokens D")
        ax.set_title(f"{fit.form}: iso-loss")
        ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def fit_command(args) -> int:
    """``mcpm tunnel fit RESULTS [--form] [--level] [--out]``."""
    level = float(args.level)
    if not 0.0 < level < 1.0:
        raise FitError(f"--level must be between 0 and 1, got {level}")
    forms = list(FORMS) if args.form == "both" else [args.form]
    n, d, loss, rows = read_results(args.results)
    results = Path(args.results)
    out = Path(args.out) if args.out else (results if results.is_dir() else results.parent)
    out.mkdir(parents=True, exist_ok=True)

    fits = [fit_scaling_law(n, d, loss, form, rows=rows) for form in forms]
    c_max = float(np.max(6.0 * n * d))
    budgets = [c_max, 10 * c_max, 100 * c_max]
    report = {"results": str(results), "n_points": len(n), "level": level, "fits": {}}
    for fit in fits:
        iv = fit.interval(level, n_resamples=BOOTSTRAP_RESAMPLES)
        print(f"{fit.form}: L = {PARAM_NAMES[fit.form][0]} N^-alpha + "
              f"{PARAM_NAMES[fit.form][2]} D^-beta + {PARAM_NAMES[fit.form][4]}  "
              f"({fit.n_points} points, RMS relative residual {fit.residual:.2%})")
        print(f"  {'constant':<9} {'value':>12}   {f'{level:.0%} interval':>27}")
        for name, value in fit.params.items():
            lo, hi = iv[name]
            print(f"  {name:<9} {value:>12.5g}   [{lo:>11.5g}, {hi:>11.5g}]")
        print(f"  {'budget 6ND':>12} {'N_opt':>11} {'D_opt':>11} {'tokens/param':>13}")
        optimal = []
        for c in budgets:
            on, od = fit.compute_optimal(c)
            print(f"  {c:>12.3g} {on:>11.3g} {od:>11.3g} {od / on:>13.1f}")
            optimal.append({"flops": c, "n_params": on, "n_tokens": od,
                            "tokens_per_param": od / on, "loss": fit.predict(on, od)})
        entry = fit.to_dict()
        entry["intervals"] = {k: list(v) for k, v in iv.items()}
        entry["compute_optimal"] = optimal
        report["fits"][fit.form] = entry

    write_json(out / "fit.json", report)
    _plot_curves(fits, n, d, loss, out / "fit_curves.png")
    _plot_isoloss(fits, n, d, out / "fit_isoloss.png")
    print(f"wrote {out / 'fit.json'}, {out / 'fit_curves.png'}, {out / 'fit_isoloss.png'}")
    return 0
