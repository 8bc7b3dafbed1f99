"""Fitting noise models by maximum likelihood on (signal, observation) pairs.

The GMM fit differs from the reference (PPN2V) on purpose:

- It starts from the binned statistics of the data: the variance of ``x - s`` per signal bin, fitted
  by weighted least squares, gives the initial variance curve.
- Default optimiser (``method="binned"``): the pairs are binned by signal (512 rows) and by offset
  ``x - s`` in steps of 0.1 noise std; each cell's centroid, weighted by its count, stands for its
  pairs. Ten million pairs shrink to a few ten thousand weighted points, on which full-batch L-BFGS
  in float64 converges in some 30-80 iterations. Float64 matters: the low-signal end contributes
  little to the total likelihood, and in float32 its gradient drowns in rounding.
- ``method="minibatch"``: Adam on random mini-batches of raw pairs with a cosine-decayed learning
  rate (the reference's approach, with a better start); the mixture is tabulated on 4096 signal
  levels per step, which halves the cost per pair.
- The variance floor comes from the data (2 % of the smallest variance in 128 signal bins) instead
  of a fixed 50, which overestimated the background noise of low-read-noise cameras.
- The weights returned (and saved) are those with the best held-out likelihood, which in practice
  are the final ones; the reference saved an intermediate iteration's. A stop request keeps the
  best weights so far.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError, StopRequested, TrainingDivergedError
from ..events import EventKind, EventTask, Reporter, StopFlag
from ..options import RULES, bounds
from ..threads import small_tensors
from .base import LOG_2PI, NoiseModel
from .diagnostics import (
    binned_statistics,
    fit_verdict,
    heldout_nll,
    noise_model_problem,
)
from .gmm import GMMNoiseModel
from .histogram import HistogramNoiseModel
from .pairs import (
    NoisePairs,
    check_pairs,
    pairs_from_calibration,
    pairs_from_clean,
    pairs_from_pseudo_clean,
    split_pairs,
)

FIT_KINDS = ("gmm", "histogram")
_GRID = 4096  # signal levels of the lookup table used by mini-batch steps
_MAX_EVAL = 250_000  # held-out pairs scored at each evaluation during the fit


def _initial_gmm(s: np.ndarray, r: np.ndarray, n_gaussians: int, degree: int,
                 min_variance: float | None):
    """Signal range, scale, floor and initial coefficients from binned statistics."""
    lo, hi = float(s.min()), float(s.max())
    n_bins = 128
    u = (s - lo) / (hi - lo)
    idx = np.clip((u * n_bins).astype(np.int64), 0, n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins).astype(np.float64)
    r64 = r.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = np.bincount(idx, weights=u, minlength=n_bins) / cnt
        m = np.bincount(idx, weights=r64, minlength=n_bins) / cnt
        var = np.bincount(idx, weights=r64 * r64, minlength=n_bins) / cnt - m**2
    use = (cnt >= 10) & np.isfinite(var) & (var > 0)
    if not use.any():
        use = (cnt >= 2) & np.isfinite(var) & (var > 0)
    if not use.any():
        raise InputError(
            "the observations equal the signal (no noise) in every signal bin: check that the "
            "noisy image, not a denoised one, was given"
        )
    total_var = float(np.var(r64))
    scale = math.sqrt(float(np.median(var[use])))
    # smallest per-bin variance, ignoring bins with few pairs unless there are no others; the
    # floor is a small fraction of it, so that it never sets the noise level (the variance can
    # still drop below a bin's average inside the lowest bin, e.g. down to the read noise)
    well = use & (cnt >= 50)
    vmin = float(var[well].min() if well.any() else var[use].min())
    if min_variance is None:
        min_variance = max(0.02 * vmin, 1e-8 * total_var, 1e-12)
    elif not (min_variance > 0 and math.isfinite(min_variance)):
        raise InputError(f"min_variance must be a positive number, got {min_variance}")
    # weighted least squares of (var - floor) on the Bernstein basis, coefficients kept positive
    ub_u = ub[use]
    basis = np.stack([math.comb(degree, j) * ub_u**j * (1 - ub_u) ** (degree - j)
                      for j in range(degree + 1)], axis=1)
    w = np.sqrt(cnt[use])
    target = np.maximum(var[use] - min_variance, 0.0)
    coef, *_ = np.linalg.lstsq(basis * w[:, None], target * w, rcond=None)
    coef = np.maximum(coef, 0.02 * max(float(target.max()), min_variance))
    theta = np.zeros((3, n_gaussians, degree + 1), np.float64)
    # components with spread-out variances around the measured one (mean factor 1) break the
    # symmetry between them and let the mixture represent heavier or lighter tails
    f = np.exp(np.linspace(-0.7, 0.7, n_gaussians)) if n_gaussians > 1 else np.ones(1)
    f /= f.mean()
    theta[2] = np.log(f[:, None] * coef[None, :] / scale**2)
    return (lo, hi), scale, min_variance, torch.from_numpy(theta).float()


def _table(model: GMMNoiseModel, theta: torch.Tensor, grid_s: torch.Tensor) -> torch.Tensor:
    """(G, 3, K) lookup table: log weight - log sd - const, mean offset, 1 / (2 var)."""
    log_w, delta, var = model.components(grid_s, theta)
    a = log_w - 0.5 * (LOG_2PI + torch.log(var))
    return torch.stack([a, delta, 0.5 / var], dim=1)


def _eval_set(train: NoisePairs, held: NoisePairs | None, seed: int):
    """Pairs scored for model selection: the held-out ones (at most _MAX_EVAL of them)."""
    src = held if held is not None else train  # no held-out data: a fixed training subset
    n = len(src)
    if n > _MAX_EVAL:
        pick = np.random.default_rng(seed + 1).choice(n, _MAX_EVAL, replace=False)
        return src.signal[pick], src.observation[pick]
    return src.signal, src.observation


def _compress(model: GMMNoiseModel, s: np.ndarray, r: np.ndarray):
    """Bin pairs by (signal, offset / noise std) and return cell centroids and counts.

    512 signal rows x offsets in steps of 0.1 noise std (std from the initial model) within
    +-10 std; pairs further out are kept one by one. The likelihood of a cell's pairs is that of
    its centroid times its count up to second-order terms in the cell size, so millions of pairs
    shrink to some ten thousand weighted points on which a full-batch optimiser converges fully.
    """
    lo, hi = model.signal_range
    n_u, z_max, z_step = 512, 10.0, 0.1
    n_z = int(round(2 * z_max / z_step))
    iu = np.clip(((s - lo) / (hi - lo) * n_u).astype(np.int64), 0, n_u - 1)
    centres = torch.tensor(lo + (np.arange(n_u) + 0.5) / n_u * (hi - lo), dtype=torch.float32)
    with torch.no_grad():
        sd_row = model.moments(centres)[1].numpy()
    z = r / sd_row[iu]
    inside = np.abs(z) < z_max
    cell = iu[inside] * n_z + ((z[inside] + z_max) / z_step).astype(np.int64).clip(0, n_z - 1)
    cnt = np.bincount(cell, minlength=n_u * n_z)
    ss = np.bincount(cell, weights=s[inside], minlength=n_u * n_z)
    sr = np.bincount(cell, weights=r[inside], minlength=n_u * n_z)
    nz = cnt > 0
    out = ~inside
    w = np.concatenate([cnt[nz].astype(np.float64), np.ones(int(out.sum()))])
    cs = np.concatenate([ss[nz] / cnt[nz], s[out].astype(np.float64)])
    cr = np.concatenate([sr[nz] / cnt[nz], r[out].astype(np.float64)])
    return cs, cr, w / w.sum()


def _fit_gmm(train: NoisePairs, held: NoisePairs | None, *, n_gaussians, degree, min_variance,
             method, iterations, batch_size, lr, device, seed, report, stop_flag):
    s = train.signal
    r = (train.observation - train.signal).astype(np.float32)
    signal_range, scale, floor, theta0 = _initial_gmm(s, r, n_gaussians, degree, min_variance)
    model = GMMNoiseModel(signal_range, n_gaussians, degree, floor, scale, theta0)
    ev_s, ev_x = _eval_set(train, held, seed)
    if method == "binned":
        if device.type == "mps":  # no float64 there; the binned problem is small anyway
            device = torch.device("cpu")
        cs, cr, w = _compress(model, s, r)
        cs, cr, w = (torch.from_numpy(a).to(device) for a in (cs, cr, w))
        dtype = torch.float64
    else:
        cs = cr = w = None
        dtype = torch.float32
    model = model.to(device)
    theta = model.theta.to(dtype).clone().requires_grad_(True)

    def evaluate() -> float:
        with torch.no_grad():
            model.theta.copy_(theta.detach())
        return heldout_nll(model, ev_s, ev_x, device=device)

    best = evaluate()
    best_theta = theta.detach().clone()
    report(EventKind.START, step=0, total=iterations, metrics={"val_nll": best})
    if method == "binned":
        step_fn, eval_every = _BinnedLBFGS(model, theta, cs, cr, w), 10
    else:
        step_fn = _minibatch_steps(model, theta, s, r, lr, batch_size, iterations, device, seed)
        eval_every = max(1, iterations // 10)
    stopped, done_steps, bad = False, 0, 0
    try:
        for step in range(1, iterations + 1):
            if stop_flag is not None:
                stop_flag.check()
            done_steps = step
            loss = step_fn(step)
            if not math.isfinite(loss):
                bad += 1
                if bad < 10 and method == "minibatch":
                    continue  # a bad mini-batch: skip it
                if not math.isfinite(best):
                    raise TrainingDivergedError(
                        "noise-model fitting produced non-finite losses; check the data for "
                        "extreme outliers or give a larger min_variance"
                    )
                break  # keep the best weights so far
            bad = 0
            metrics = {"train_nll": loss}
            converged = method == "binned" and step_fn.converged
            if step % eval_every == 0 or step == iterations or converged:
                val = evaluate()
                metrics["val_nll"] = val
                if math.isfinite(val) and val <= best:
                    best, best_theta = val, theta.detach().clone()
            report(EventKind.STEP, step=step, total=iterations, metrics=metrics)
            if converged:
                break
    except StopRequested:
        stopped = True
    with torch.no_grad():
        model.theta.copy_(best_theta)
    return model, {"method": method, "iterations": done_steps, "stopped": stopped}


class _BinnedLBFGS:
    """L-BFGS iterations on the binned pairs (float64), restarted when a line search stalls.

    Near a degenerate mixture (e.g. Gaussian data, where all components want the same variance)
    the curvature memory can point the strong-Wolfe line search nowhere (step 0); forgetting it
    and restarting from the gradient gets it moving again. ``stalls`` counts consecutive steps
    without any decrease; three in a row (each after a restart) mean convergence, and so does a
    gain below ``tol`` nats per pixel over the last 10 iterations (a mixture close to degenerate
    keeps creeping along flat directions by amounts far below the statistical precision).
    """

    def __init__(self, model, theta, cs, cr, w):
        self.model, self.theta, self.cs, self.cr, self.w = model, theta, cs, cr, w
        self.best, self.stalls, self.history = math.inf, 0, []
        self.tol = 1e-5
        self._new()

    def _new(self):
        self.opt = torch.optim.LBFGS([self.theta], lr=1.0, max_iter=1, history_size=20,
                                     line_search_fn="strong_wolfe")

    def _closure(self):
        self.opt.zero_grad(set_to_none=True)
        loss = -(self.w * self.model.log_likelihood(self.cs + self.cr, self.cs, self.theta)).sum()
        loss.backward()
        return loss

    def __call__(self, _step) -> float:
        loss = float(self.opt.step(self._closure).detach())
        if not math.isfinite(loss):
            return loss
        gain = self.best - loss
        if gain <= 1e-13 * max(1.0, abs(loss)):
            self.stalls += 1
            self._new()
        else:
            self.stalls = 0
        self.best = min(self.best, loss)
        self.history.append(self.best)
        return loss

    @property
    def converged(self) -> bool:
        h = self.history
        return self.stalls >= 3 or (len(h) > 10 and h[-11] - h[-1] < self.tol)


def _minibatch_steps(model, theta, s, r, lr, batch_size, iterations, device, seed):
    """One Adam step on a random mini-batch per call (cosine-decayed lr); returns its loss.

    The mixture is evaluated on a grid of _GRID signal levels and looked up per pair, which
    halves the cost per pair (the parameters are smooth in the signal).
    """
    lo, hi = model.signal_range
    gen = torch.Generator().manual_seed(int(seed))
    n = s.size
    r_t = torch.from_numpy(r).to(device)
    idx_t = torch.from_numpy(
        np.clip(((s - lo) / (hi - lo) * _GRID).astype(np.int32), 0, _GRID - 1)
    ).to(device)
    grid_s = torch.tensor(lo + (np.arange(_GRID) + 0.5) / _GRID * (hi - lo), dtype=torch.float32,
                          device=device)
    opt = torch.optim.Adam([theta], lr=lr)
    batch = min(int(batch_size), n)

    def step(k):
        for g in opt.param_groups:  # cosine decay to 1% of lr
            g["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (k - 1) / iterations)))
        sel = torch.randint(0, n, (batch,), generator=gen).to(device)
        table = _table(model, theta, grid_s).reshape(_GRID, -1)
        a, d, c = table.index_select(0, idx_t[sel]).reshape(batch, 3, -1).unbind(1)
        e = r_t[sel].unsqueeze(-1) - d
        loss = -torch.logsumexp(a - c * e * e, dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        return float(loss.detach())

    return step


def fit_noise_model(
    signal,
    observation=None,
    kind: str = "gmm",
    *,
    n_gaussians: int = 3,
    degree: int = 1,
    min_variance: float | None = None,
    method: str = "binned",
    iterations: int | None = None,
    batch_size: int = 131_072,
    lr: float = 0.05,
    val_fraction: float = 0.1,
    signal_bins: int | None = None,
    offset_bins: int | None = None,
    compare_histogram: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    callbacks=None,
    stop_flag: StopFlag | None = None,
) -> NoiseModel:
    """Fit a GMM or histogram noise model by maximum likelihood on pixel pairs.

    Parameters
    ----------
    signal : NoisePairs or array-like
        Pairs from ``pairs_from_*``, or the clean signal (any shape) with ``observation``.
    observation : array-like, optional
        Noisy observation, same shape as ``signal`` (when ``signal`` is an array).
    kind : {"gmm", "histogram"}
    n_gaussians, degree : int
        GMM components (default 3) and polynomial degree in the signal (default 1).
    min_variance : float, optional
        GMM variance floor; default 2 % of the smallest variance of ``x - s`` in 128 signal bins.
    method : {"binned", "minibatch"}
        GMM optimiser. ``"binned"`` (default): the pairs are binned by signal and by offset in
        steps of a tenth of the noise std (cell centroids and counts; far outliers kept as they
        are) and L-BFGS in float64 runs to convergence on the weighted cells; fast and
        deterministic for any number of pairs. ``"minibatch"``: Adam on random mini-batches of the
        raw pairs, ``batch_size`` pairs per step, initial learning rate ``lr`` decayed to 1 % along
        a cosine.
    iterations : int, optional
        Maximum L-BFGS iterations (default 200; it usually converges in 30-80) or Adam steps
        (default 400).
    batch_size, lr : int, float
        Mini-batch size and Adam learning rate (``method="minibatch"`` only).
    val_fraction : float
        Fraction of pairs held out for the held-out likelihood, model selection and diagnostics.
    signal_bins, offset_bins : int, optional
        Histogram resolution (default: from the data).
    compare_histogram : bool
        Also build a histogram model on the training pairs and report its held-out NLL next to
        the GMM's.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    seed : int
        Seeds the held-out split and the mini-batches (same seed, same result on the same machine).
    callbacks : callable or list, optional
        Receive :class:`ProgressEvent` s (task ``"noise-fit"``): ``start``, ``step`` (metrics
        ``train_nll``, and ``val_nll`` when evaluated), ``done`` or ``stopped``.
    stop_flag : StopFlag, optional
        Checked before every step; when set, fitting stops and the best weights so far are kept.

    Returns
    -------
    NoiseModel
        A :class:`GMMNoiseModel` or :class:`HistogramNoiseModel`, on the CPU, whose ``info`` (also
        saved, and shown by ``describe()``) holds the fitted signal range, fit settings, held-out
        NLLs, binned statistics and the verdict.

    Raises
    ------
    InputError
        For NaN/inf values, constant images, mismatched shapes or too few pairs.
    """
    if kind not in FIT_KINDS:
        raise InputError(f"unknown noise model kind {kind!r}: choose one of {', '.join(FIT_KINDS)}")
    (k_lo, k_hi), (d_lo, d_hi) = bounds("n_gaussians"), bounds("degree")
    if kind == "gmm" and not (k_lo <= int(n_gaussians) <= k_hi and d_lo <= int(degree) <= d_hi):
        raise InputError(
            f"n_gaussians must be {k_lo}..{k_hi} and degree {d_lo}..{d_hi}, got {n_gaussians} and "
            f"{degree} (3 and 1 are the usual choice)"
        )
    if method not in ("binned", "minibatch"):
        raise InputError(f"unknown fitting method {method!r}: choose 'binned' or 'minibatch'")
    if iterations is None:
        iterations = 200 if method == "binned" else 400
    for name, v in (("iterations", iterations), ("batch_size", batch_size)):
        if int(v) < 1:
            raise InputError(f"{name} must be at least 1, got {v}")
    lr_max = RULES["lr"].maximum
    if not (0 < lr <= lr_max):  # NaN fails too
        raise InputError(f"lr must be a positive number of at most {lr_max:g}, got {lr}")
    if isinstance(signal, NoisePairs):
        pairs = signal
    else:
        if observation is None:
            raise InputError("give the noisy observation next to the signal (or a NoisePairs)")
        pairs = check_pairs(signal, observation)
    dev = resolve_device(device)
    report = Reporter(EventTask.NOISE_FIT, callbacks)
    t0 = time.perf_counter()
    train, held = split_pairs(pairs, val_fraction, seed)
    settings: dict = {"kind": kind, "val_fraction": val_fraction, "seed": int(seed)}
    hist = None
    if kind == "histogram" or compare_histogram:
        hist = HistogramNoiseModel.from_pairs(train.signal, train.observation, signal_bins, offset_bins)
        _check_fitted(hist, train)  # before a GMM is fitted: it is compared with this one
    with small_tensors(dev):  # binned cells, mini-batches, diagnostics
        return _fit(train, held, kind, dev, report, t0, settings, hist, stop_flag,
                    n_gaussians=n_gaussians, degree=degree, min_variance=min_variance, method=method,
                    iterations=int(iterations), batch_size=int(batch_size), lr=float(lr), seed=seed)


#: a mixture component this light ...
DEAD_WEIGHT = 0.02
#: ... whose mean lies this many of the other components' stds from theirs, somewhere in the
#: fitted range, holds no pairs: a fit that ran into it (L-BFGS can push a component away from the
#: data, where it costs only log(1 - weight) nats) inflates the mixture's std and, as the mixture
#: mean is kept at the signal, shifts the other components' means
DEAD_DISTANCE = 5.0


def dead_components(model) -> list[int]:
    """Components of a GMM that hold (almost) no pairs anywhere in its fitted range."""
    lo, hi = model.signal_range
    s = torch.linspace(lo, hi, 33, dtype=torch.float32)
    with torch.no_grad():
        log_w, delta, var = model.components(s)
    w = log_w.exp()
    dead = []
    for k in range(w.shape[-1]):
        others = [j for j in range(w.shape[-1]) if j != k]
        if not others:
            break
        wo = w[:, others] / w[:, others].sum(-1, keepdim=True)
        mo = (wo * delta[:, others]).sum(-1)
        so = ((wo * (var[:, others] + delta[:, others] ** 2)).sum(-1) - mo**2).clamp_min(0).sqrt()
        far = (delta[:, k] - mo).abs() > DEAD_DISTANCE * so
        if bool(((w[:, k] < DEAD_WEIGHT) & far).any()):
            dead.append(k)
    return dead


def _fit(train, held, kind, dev, report, t0, settings, hist, stop_flag, *, n_gaussians,
         degree, min_variance, method, iterations, batch_size, lr, seed):
    if kind == "gmm":
        fit_kw = dict(degree=degree, min_variance=min_variance, method=method,
                      iterations=iterations, batch_size=batch_size, lr=lr, device=dev, seed=seed,
                      report=report, stop_flag=stop_flag)
        model, run = _fit_gmm(train, held, n_gaussians=n_gaussians, **fit_kw)
        k = n_gaussians
        while k > 1 and not run.get("stopped") and dead_components(model):
            # a component ran away from the data: fit again with one fewer and keep it
            k -= 1
            model, run = _fit_gmm(train, held, n_gaussians=k, **fit_kw)
            run["refitted"] = {"from_gaussians": n_gaussians, "why": "a mixture component held "
                               "no pairs (it had run away from the data)"}
        model = model.cpu()
        settings.update(n_gaussians=k, degree=degree, iterations_planned=iterations, **run)
        if method == "minibatch":
            settings.update(lr=lr, batch_size=batch_size)
        if not all(torch.isfinite(t).all() for t in model.buffers()):
            raise TrainingDivergedError("noise-model fitting produced NaN parameters; check the data")
        _check_fitted(model, train)
    else:
        report(EventKind.START, step=0, total=1)
        model = hist
        settings.update(stopped=False, signal_bins=hist.n_signal_bins, offset_bins=hist.n_offset_bins)
    stopped = bool(settings.get("stopped"))
    info = dict(model.info)
    info.update(diagnose(model, train, held, histogram=hist if kind == "gmm" else None,
                         stopped=stopped))
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    info["fit"] = settings
    model.info = info
    report(EventKind.STOPPED if stopped else EventKind.DONE, step=settings.get("iterations", 1),
           total=settings.get("iterations_planned", 1),
           metrics={"heldout_nll": info.get("heldout_nll")})
    return model


def _check_fitted(model: NoiseModel, train: NoisePairs) -> None:
    """Refuse (:class:`InputError`) a fitted model whose numbers are not finite where the data
    are, before it is described, compared or saved (it would print NaN and fail in training)."""
    lo, hi = float(train.signal.min()), float(train.signal.max())
    problem = noise_model_problem(model, (lo, hi))
    if not problem:
        return
    r = np.asarray(train.observation, np.float64) - np.asarray(train.signal, np.float64)
    sd = float(np.std(r))
    extreme = max(abs(lo), abs(hi)) > 1e12 or 0 < sd < 1e-12 * max(1.0, abs(hi))
    why = ("values this large or this small are beyond what float32 arithmetic resolves: rescale "
           "the data (multiply or divide by a power of ten) and fit again" if extreme or sd < 1e-20
           else "check the data")
    raise InputError(f"the {model.kind} noise model fitted to these pixel pairs is unusable: "
                     f"{problem}; the signals run from {lo:.3g} to {hi:.3g} with a noise std of "
                     f"about {sd:.3g}: {why}")


def diagnose(model: NoiseModel, train: NoisePairs, held: NoisePairs | None = None,
             histogram: NoiseModel | None = None, stopped: bool = False) -> dict:
    """Diagnostics of a fitted model as a JSON-able dict (stored in ``model.info`` by the fit).

    Keys: ``source``, ``n_pairs``, ``n_heldout``, ``signal_range``, ``heldout_nll`` (nats/pixel on
    ``held``, or on ``train`` when there is no held-out set, flagged by ``nll_on``),
    ``heldout_nll_histogram``, ``binned`` (see :func:`binned_statistics`), ``verdict``, ``reasons``,
    ``notes``.
    """
    ev = held if held is not None else train
    out: dict = {
        "source": train.source,
        "n_pairs": len(train) + (len(held) if held is not None else 0),
        "n_heldout": len(held) if held is not None else 0,
        "signal_range": [float(train.signal.min()), float(train.signal.max())],
        "nll_on": "held-out pairs" if held is not None else "training pairs",
        "notes": list(train.notes),
        **({"pairs_record": dict(train.record)} if train.record else {}),
    }
    nll = heldout_nll(model, ev.signal, ev.observation)
    out["heldout_nll"] = nll if math.isfinite(nll) else None
    out["heldout_nll_histogram"] = None
    if histogram is not None:
        h = heldout_nll(histogram, ev.signal, ev.observation)
        out["heldout_nll_histogram"] = h if math.isfinite(h) else None
    binned = binned_statistics(model, train.signal, train.observation)
    out["binned"] = binned
    v = fit_verdict(model, binned, out["n_pairs"], nll, out["heldout_nll_histogram"],
                    notes=train.notes, stopped=stopped)
    out.update(v)
    return out


# -- convenience: from images to a fitted model -------------------------------------------------
def fit_from_calibration(frames, kind: str = "gmm", **kwargs) -> NoiseModel:
    """Fit on a stack of noisy frames of a static sample (signal = mean over frames).

    ``kwargs`` go to :func:`fit_noise_model`. Warns (``NoiseFitWarning``) with few frames.
    """
    return fit_noise_model(pairs_from_calibration(frames), kind=kind, **kwargs)


def fit_from_clean(clean, noisy, kind: str = "gmm", **kwargs) -> NoiseModel:
    """Fit on a clean image paired with one or more noisy images of it."""
    return fit_noise_model(pairs_from_clean(clean, noisy), kind=kind, **kwargs)


def _frames(images, name):
    from ..data.arrays import to_frames

    return to_frames(images, None if isinstance(images, (list, tuple)) else _axes(images), name)


def _axes(images):
    return {2: "YX", 3: "SYX"}.get(np.ndim(images))


def n2v_notes(info: dict) -> list[str]:
    """Why a Noise2Void run's pseudo-clean image may not be clean yet: it was cut short by a time
    limit or a stop before its validation loss levelled off (``[]`` when it converged)."""
    reason = info.get("stop_reason")
    steps = info.get("steps")
    if info.get("converged", True) or reason not in ("time_budget", "stopped", "max_steps"):
        return []
    how = {"time_budget": f"the time limit of {info.get('time_budget_s') or 0:g} s",
           "stopped": "a stop request",
           "max_steps": f"its step limit ({info.get('max_steps')})"}[reason]
    return [f"Noise2Void was cut short by {how} after {steps} steps, before its validation loss "
            "levelled off: the pseudo-clean image may still hold noise or blur, which biases the "
            "fitted noise; let Noise2Void train until it converges (no time limit)"]


def bootstrap_pairs(noisy, pseudo_clean=None, *, clip_percentiles=(0.5, 99.5), n2v: dict | None = None,
                    device="auto", seed: int = 0, callbacks=None, stop_flag=None,
                    source: str | None = None, on_pseudo_clean=None) -> NoisePairs:
    """Pairs (noisy, pseudo-clean) for fitting without calibration data.

    Parameters
    ----------
    noisy : array (Y, X) or (S, Y, X), or list of 2D arrays
    pseudo_clean : same structure as ``noisy``, optional
        Any denoised version of ``noisy`` (e.g. another denoiser's output). If omitted, the
        built-in Noise2Void network is trained on ``noisy`` (until its validation loss levels
        off) and its prediction is used.
    clip_percentiles : (low, high) or None
        Pairs whose pseudo-clean value is outside these percentiles are left out.
    n2v : dict, optional
        Options for :func:`napari_hdn.engine.noise.n2v.train_n2v` (``max_steps``, ``time_budget_s``...).
    stop_flag : StopFlag, optional
        A stop during Noise2Void training ends the training only: the pseudo-clean image is still
        predicted and the pairs returned (the flag is cleared, so that a later stop can end the
        fit), with a note that Noise2Void was cut short.
    source : str, optional
        Label stored with the fit (default ``"n2v"`` or ``"pseudo-clean"``).
    on_pseudo_clean : callable, optional
        Called with the Noise2Void prediction (a list of 2D frames) before the pairs are made,
        e.g. to save it.

    Notes
    -----
    Noise2Void reports events with task ``"n2v"``, its prediction of the pseudo-clean image
    ``"n2v-predict"`` (a step per frame).
    """
    frames = _frames(noisy, "noisy image")
    record: dict = {}
    notes: list[str] = []
    if pseudo_clean is None:
        from .n2v import train_n2v

        den = train_n2v(frames, device=device, seed=seed, callbacks=callbacks, stop_flag=stop_flag,
                        **(n2v or {}))
        if den.info.get("stopped") and stop_flag is not None:
            stop_flag.clear()  # the stop ended Noise2Void; predicting and fitting go on
        pseudo = den.predict(frames, device=device, callbacks=callbacks)
        if on_pseudo_clean is not None:
            on_pseudo_clean(pseudo)
        source = source or "n2v"
        record["n2v"] = {k: den.info.get(k) for k in ("steps", "converged", "stop_reason",
                                                      "seconds", "best_val_loss", "lr_drops",
                                                      "time_budget_s")}
        notes = n2v_notes(den.info)
    else:
        pseudo = _frames(pseudo_clean, "pseudo-clean image")
        source = source or "pseudo-clean"
        if len(pseudo) != len(frames) or any(p.shape != f.shape for p, f in zip(pseudo, frames)):
            raise InputError(
                "the pseudo-clean images must match the noisy images frame for frame and pixel for "
                f"pixel (noisy: {len(frames)} frame(s) of {frames[0].shape}, pseudo-clean: "
                f"{len(pseudo)} of {pseudo[0].shape})"
            )
    x = np.concatenate([f.ravel() for f in frames])
    s = np.concatenate([np.asarray(p, np.float32).ravel() for p in pseudo])
    pairs = pairs_from_pseudo_clean(x, s, clip_percentiles, source=source)
    pairs.notes.extend(notes)
    pairs.record.update(record)
    return pairs


def fit_bootstrap(noisy, pseudo_clean=None, kind: str = "gmm", *, clip_percentiles=(0.5, 99.5),
                  n2v: dict | None = None, device="auto", seed: int = 0, callbacks=None,
                  stop_flag=None, **kwargs) -> NoiseModel:
    """Fit without calibration data, on (noisy, pseudo-clean) pairs; see :func:`bootstrap_pairs`.

    The N2V training (if any) reports events with task ``"n2v"``, its prediction
    ``"n2v-predict"``, then the fit ``"noise-fit"``. A stop during Noise2Void ends Noise2Void and
    the fit goes on; a stop during the fit keeps the best fit so far.
    """
    pairs = bootstrap_pairs(noisy, pseudo_clean, clip_percentiles=clip_percentiles, n2v=n2v,
                            device=device, seed=seed, callbacks=callbacks, stop_flag=stop_flag)
    return fit_noise_model(pairs, kind=kind, device=device, seed=seed, callbacks=callbacks,
                           stop_flag=stop_flag, **kwargs)
