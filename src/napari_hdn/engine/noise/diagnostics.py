"""Is this noise model any good? Held-out likelihood, per-signal-bin statistics, a verdict, a figure.

Users of similar tools report that there is no reliable way to tell whether a noise model is good.
Everything here answers that from data the model was not fitted on where possible:

- :func:`heldout_nll`: mean negative log-likelihood (nats per pixel) on held-out pairs. Compare it
  with the histogram model's on the same pairs (lower is better; only differences matter, and only
  between models evaluated on the same pairs).
- :func:`binned_statistics`: per signal bin, the empirical mean and std of ``x`` next to the model's.
- :func:`fit_verdict`: ``"good"`` or ``"suspicious"`` with plain reasons, and the checks that
  passed (so that a "good" says why too).
- :func:`diagnostics_figure`: p(x | s) over the empirical histogram at a few signal levels, and the
  std-vs-signal curve, as a matplotlib ``Figure`` (embeddable in Qt; ``save_figure`` writes a PNG).
- :func:`check_noise_model`: refuse a model whose numbers give NaN or infinity (an edited file, a
  parameter beyond float32), before training starts or a description prints NaN.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..threads import small_tensors
from .base import NoiseModel

#: below this many pairs the verdict calls the fit unreliable
FEW_PAIRS = 50_000
#: a signal bin needs this many pairs to count as covered
MIN_BIN_COUNT = 50
#: |model std / empirical std - 1| above this in a covered bin is suspicious ...
STD_TOLERANCE = 0.10
#: ... and only when it is also this many standard errors of the bin's empirical std: the std of
#: n pairs is itself uncertain by about 1 / sqrt(2 (n - 1)) (8 % for 90 pairs), and the sparse
#: bright end of a sample would otherwise call a correct model suspicious by chance
STD_SIGMAS = 3.0
#: ... but never more than this in a covered bin: a model that far from its own pairs is not "good"
#: however few pairs the bin has
MAX_STD_TOLERANCE = 0.25
#: GMM held-out NLL this much above the histogram's (nats/pixel) is suspicious
NLL_TOLERANCE = 0.05
#: the variance floor is "dominating" where it is more than this fraction of the model variance
FLOOR_FRACTION = 0.5


def _t(a, device=None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


@torch.no_grad()
def heldout_nll(model: NoiseModel, signal, observation, batch_size: int = 1 << 20,
                device=None) -> float:
    """Mean negative log-likelihood (nats per pixel) of ``observation`` given ``signal``.

    Evaluated in chunks of ``batch_size`` pairs on ``device`` (default: where the model is).
    """
    s = np.asarray(signal, dtype=np.float32).ravel()
    x = np.asarray(observation, dtype=np.float32).ravel()
    if device is None:
        bufs = list(model.buffers())
        device = bufs[0].device if bufs else torch.device("cpu")
    total = 0.0
    for k in range(0, s.size, batch_size):
        ll = model.log_likelihood(_t(x[k : k + batch_size], device), _t(s[k : k + batch_size], device))
        total += float(ll.double().sum())
    return -total / max(s.size, 1)


@torch.no_grad()
def model_moments(model: NoiseModel, signal) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of p(x | s) at the given signal levels, as numpy float64 arrays."""
    bufs = list(model.buffers())
    device = bufs[0].device if bufs else torch.device("cpu")
    m, sd = model.moments(_t(np.atleast_1d(signal), device))
    return m.double().cpu().numpy(), sd.double().cpu().numpy()


def binned_statistics(model: NoiseModel | None, signal, observation, n_bins: int = 20,
                      signal_range: tuple[float, float] | None = None) -> dict:
    """Per signal bin: pair count, mean signal, empirical mean/std of x, and the model's.

    The empirical std is that of ``x - s`` within the bin, i.e. the spread of ``x`` at a given
    signal, without the spread of the signal inside the bin. Bins are of equal width over
    ``signal_range`` (default: the model's fitted range, else the data's). Returns lists (JSON-able);
    bins with fewer than 2 pairs have ``None`` statistics.
    """
    s = np.asarray(signal, dtype=np.float32).ravel()
    x = np.asarray(observation, dtype=np.float32).ravel()
    if signal_range is None:
        signal_range = getattr(model, "signal_range", None) or (float(s.min()), float(s.max()))
    lo, hi = (float(v) for v in signal_range)
    if not hi > lo:
        hi = lo + 1.0
    idx = np.clip(((s - lo) / (hi - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins).astype(np.float64)
    r = (x - s).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_mean = np.bincount(idx, weights=s.astype(np.float64), minlength=n_bins) / cnt
        x_mean = np.bincount(idx, weights=x.astype(np.float64), minlength=n_bins) / cnt
        r_mean = np.bincount(idx, weights=r, minlength=n_bins) / cnt
        r_var = np.bincount(idx, weights=r * r, minlength=n_bins) / cnt - r_mean**2
        r_var *= cnt / np.maximum(cnt - 1, 1)
    ok = cnt >= 2
    centres = lo + (np.arange(n_bins) + 0.5) * (hi - lo) / n_bins
    s_eval = np.where(ok, s_mean, centres)
    out = {
        "edges": [lo + k * (hi - lo) / n_bins for k in range(n_bins + 1)],
        "count": [int(c) for c in cnt],
        "signal": [float(v) for v in s_eval],
        "empirical_mean": [float(v) if o else None for v, o in zip(x_mean, ok)],
        "empirical_std": [float(math.sqrt(max(v, 0.0))) if o else None for v, o in zip(r_var, ok)],
    }
    if model is not None:
        mm, ms = model_moments(model, s_eval)
        # the model's mean of x over the bin's pairs: mean offset at the bin's mean signal
        out["model_mean"] = [float(v) for v in mm]
        out["model_std"] = [float(v) for v in ms]
    return out


def std_tolerance(count) -> np.ndarray:
    """Largest |model std / data std - 1| accepted in a signal bin of ``count`` pairs: the
    bin's own sampling error (``STD_SIGMAS`` standard errors), at least ``STD_TOLERANCE`` and at
    most ``MAX_STD_TOLERANCE``."""
    n = np.maximum(np.asarray(count, float), 2.0)
    tol = np.maximum(STD_TOLERANCE, STD_SIGMAS / np.sqrt(2.0 * (n - 1.0)))
    return np.minimum(tol, MAX_STD_TOLERANCE)


def fit_verdict(model: NoiseModel, binned: dict, n_pairs: int, heldout: float | None = None,
                heldout_histogram: float | None = None, notes=(), stopped: bool = False) -> dict:
    """Plain verdict on a fitted noise model.

    Returns ``{"verdict": "good"|"suspicious", "reasons": [...], "checks": [...]}``: ``reasons``
    say what is suspicious, ``checks`` what was checked and passed, with the numbers.
    """
    reasons: list[str] = []
    checks: list[str] = []
    finite = all(torch.isfinite(t).all() for t in model.buffers())
    std = np.array([np.nan if v is None else v for v in binned.get("model_std", [])], float)
    if not finite or (heldout is not None and not math.isfinite(heldout)):
        reasons.append("the fit produced NaN or infinite values: check the data for outliers or "
                       "saturated pixels and fit again")
    if n_pairs < FEW_PAIRS:
        reasons.append(f"few pairs ({n_pairs:,}): the fit may be noisy; use at least {FEW_PAIRS:,} "
                       "(more frames or larger images)")
    else:
        checks.append(f"{n_pairs:,} pixel pairs (at least {FEW_PAIRS:,} wanted)")
    cnt = np.asarray(binned["count"])
    covered = cnt >= MIN_BIN_COUNT
    n_bins = cnt.size
    lo, hi = binned["edges"][0], binned["edges"][-1]
    if covered.sum() < 0.5 * n_bins:
        reasons.append(
            f"the signal range is barely covered: only {int(covered.sum())} of {n_bins} signal bins "
            f"between {lo:.4g} and {hi:.4g} have {MIN_BIN_COUNT} pairs or more, so the model is "
            "mostly interpolated there; use data with intensities spread over the whole range (if "
            "a few outlier pixels, e.g. hot or saturated ones, stretch the range, crop them out)"
        )
    else:
        checks.append(f"{int(covered.sum())} of {n_bins} signal bins between {lo:.4g} and {hi:.4g} "
                      f"have {MIN_BIN_COUNT} pairs or more")
    emp = np.array([np.nan if v is None else v for v in binned["empirical_std"]], float)
    sig = np.asarray(binned["signal"], float)
    good = covered & np.isfinite(emp)
    if good.any():
        spread = float(sig[good].max() - sig[good].min())
        typical = float(np.median(emp[good]))
        if spread < 2.0 * typical:
            reasons.append(
                f"the signals span only {spread:.3g}, less than twice the noise std ({typical:.3g}): "
                "the dependence of the noise on the signal cannot be measured from these data"
            )
    if std.size and good.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = std / emp - 1.0
        rel = np.where(good & np.isfinite(rel), rel, 0.0)
        tol = std_tolerance(cnt)
        k = int(np.argmax(np.abs(rel) / tol))
        j = int(np.argmax(np.abs(rel)))
        if abs(rel[k]) > tol[k]:
            reasons.append(
                f"the model's noise std differs from the data's by {rel[k]:+.0%} at signal {sig[k]:.4g} "
                f"(model {std[k]:.3g}, data {emp[k]:.3g} from {int(cnt[k]):,} pairs, which allow "
                f"±{tol[k]:.0%}); try more Gaussians or a higher degree, or the histogram model"
            )
        else:
            checks.append(
                f"the model's noise std matches the data's in all {int(good.sum())} covered bins: "
                f"largest difference {rel[j]:+.0%} at signal {sig[j]:.4g}, where {int(cnt[j]):,} "
                f"pairs allow ±{tol[j]:.0%}"
            )
    floor = getattr(model, "min_variance", None)
    if floor is not None and std.size and np.isfinite(std).any():
        frac = floor / np.maximum(std**2, 1e-30)
        frac = np.where(covered & np.isfinite(frac), frac, 0.0)
        if frac.max() > FLOOR_FRACTION:
            k = int(np.argmax(frac))
            reasons.append(
                f"the variance floor ({floor:.3g}) makes up {frac[k]:.0%} of the model's variance at "
                f"signal {sig[k]:.4g}: the noise there is at the floor, not measured; give a smaller "
                "min_variance"
            )
        else:
            checks.append(f"the variance floor is at most {frac.max():.0%} of the model's variance")
    if (heldout is not None and heldout_histogram is not None and model.kind != "histogram"
            and math.isfinite(heldout) and math.isfinite(heldout_histogram)):
        if heldout - heldout_histogram > NLL_TOLERANCE:
            reasons.append(
                f"the histogram model explains held-out pairs better ({heldout_histogram:.4f} vs "
                f"{heldout:.4f} nats/pixel): the mixture is too simple for this noise; try more "
                "Gaussians or a higher degree"
            )
        else:
            checks.append(
                f"held-out NLL {heldout:.4f} nats/pixel, the histogram model's {heldout_histogram:.4f} "
                f"(more than {NLL_TOLERANCE} above it would be suspicious)"
            )
    if stopped:
        reasons.append("fitting was stopped before it finished: the model may not have converged")
    reasons.extend(notes)
    return {"verdict": "suspicious" if reasons else "good", "reasons": reasons, "checks": checks}


def verdict_warning(model) -> str:
    """One paragraph for a noise model whose fit was judged "suspicious": the verdict, its first
    reasons and what to do about it; ``""`` for a model judged good or with known parameters.

    Training warns with it before it starts (the command line and the Training widget show it).
    """
    info = getattr(model, "info", None) or {}
    if info.get("verdict") != "suspicious":
        return ""
    reasons = [str(r) for r in info.get("reasons") or []]
    why = reasons[0] if reasons else "see its diagnostics"
    if len(reasons) > 1:
        why += f" (and {len(reasons) - 1} more reason{'s' if len(reasons) > 2 else ''})"
    source = info.get("source")
    fixes = []
    if source == "n2v":
        fixes.append("fit it again with more Noise2Void steps (and no time limit)")
    if source in ("n2v", "pseudo-clean"):
        fixes.append("fit it from calibration frames (many frames of a static sample), if there are any")
    if getattr(model, "kind", "") != "histogram":
        fixes.append("try the histogram model")
    fixes.append("look at its diagnostics figure")
    return (f"the noise model's fit was judged suspicious: {why}. An HDN trained with it may "
            f"restore the data poorly. What to do: {'; or '.join(fixes)}")


def _numbers(value):
    """The numbers in a JSON-able parameter value (nested lists and dicts), for the finite check."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)


def noise_model_problem(model, signal_range: tuple[float, float] | None = None) -> str:
    """What makes ``model`` unusable, in words (``""`` when nothing does): a parameter that is NaN
    or infinite, or a noise std or log-likelihood that is not a finite number (or an evaluation
    that fails) at probe signals across ``signal_range`` (the data's) and the fitted range, with
    observations a few noise stds and one data scale away. Cheap: some hundred evaluations."""
    try:
        params, tensors = model.get_state()
    except Exception as exc:  # noqa: BLE001 - whatever a broken model raises
        return f"its parameters cannot be read ({exc})"
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"its {name} holds NaN or infinite values"
    for name, value in params.items():
        if name != "info" and any(not math.isfinite(v) for v in _numbers(value)):
            return f"its parameter {name} is {value!r}"
    ranges = [r for r in (signal_range, getattr(model, "fitted_signal_range", None))
              if r is not None and all(math.isfinite(float(v)) for v in r)]
    if not ranges:
        ranges = [(0.0, 1000.0)]
    levels = np.unique(np.concatenate([np.linspace(float(lo), float(hi), 9) for lo, hi in ranges]))
    scale = max(float(hi) - float(lo) for lo, hi in ranges) / 8 or 1.0  # about one data std
    try:
        with torch.no_grad():
            s = torch.tensor(levels, dtype=torch.float32)
            mean, sd = model.moments(s)
            bad = ~(torch.isfinite(mean) & torch.isfinite(sd) & (sd > 0))
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                what = ("mean" if not bool(torch.isfinite(mean[k])) else "std")
                value = float(mean[k] if what == "mean" else sd[k])
                return f"its noise {what} is {value:.3g} at signal {float(s[k]):.5g}"
            steps = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
            x = torch.cat([s[:, None] + sd[:, None] * steps,
                           s[:, None] + scale * torch.tensor([-1.0, 1.0])], dim=1)
            ll = model.log_likelihood(x, s[:, None].expand_as(x))
            bad = ~torch.isfinite(ll)
            if bool(bad.any()):
                i, j = (int(v) for v in bad.nonzero()[0])
                return (f"its log-likelihood is {float(ll[i, j]):.3g} at signal {float(s[i]):.5g} "
                        f"and observation {float(x[i, j]):.5g}")
    except (ArithmeticError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        return f"evaluating it fails ({str(exc)[:200]})"
    return ""


def check_noise_model(model, signal_range: tuple[float, float] | None = None,
                      what: str = "the noise model", error: type = InputError) -> None:
    """Refuse (``error``, one line) a noise model :func:`noise_model_problem` finds unusable:
    training with it would fail at its first step, and its description would show NaN."""
    problem = noise_model_problem(model, signal_range)
    if not problem:
        return
    if getattr(model, "fitted_signal_range", None) is None:  # known parameters, e.g. a sigma
        fix = ("give parameters in the data's units that float32 arithmetic can hold (a noise "
               "std far from 0 and far below 1e18)")
    else:
        fix = ("fit it again (napari-hdn noise-model fit, or the Noise model widget) or, for a "
               "file that was edited, restore its parameters")
    raise error(f"{what} is broken: {problem} ({model!r}); it cannot be used: {fix}")


# -- figure ------------------------------------------------------------------------------------
def _levels(model, s: np.ndarray | None, levels):
    if levels is not None:
        return [float(v) for v in levels]
    if s is not None:
        return [float(v) for v in np.quantile(s, [0.05, 0.35, 0.65, 0.95])]
    lo, hi = model.signal_range
    return [lo + f * (hi - lo) for f in (0.05, 0.35, 0.65, 0.95)]


@torch.no_grad()
def _mixture_density(model, s_values: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Mean over s_values of p(x | s) on the grid xs (what a histogram of those pairs estimates)."""
    sv = _t(s_values)[:, None]
    xv = _t(xs)[None, :]
    dev = next(iter(model.buffers())).device if list(model.buffers()) else torch.device("cpu")
    ll = model.log_likelihood(xv.to(dev), sv.to(dev))
    return ll.double().exp().mean(0).cpu().numpy()


def diagnostics_figure(model: NoiseModel, signal=None, observation=None,
                       histogram: NoiseModel | None = None, levels=None, figsize=(11, 7)):
    """Figure with the fitted p(x | s) over the empirical histogram and the std-vs-signal curve.

    Parameters
    ----------
    model : NoiseModel
        The fitted model (any kind with a ``signal_range`` or with stored binned statistics).
    signal, observation : array-like, optional
        Pairs to compare with (ideally held-out ones). Without them only the model's curves and
        the statistics stored at fitting time are drawn.
    histogram : NoiseModel, optional
        An empirical model to draw next to ``model`` (dashed).
    levels : list of float, optional
        Signal levels of the top panels (default: the 5, 35, 65 and 95 % quantiles of the signal).

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot: embed it in a Qt canvas or save it with :func:`save_figure`.
    """
    with small_tensors():
        return _figure(model, signal, observation, histogram, levels, figsize)


def _figure(model, signal, observation, histogram, levels, figsize):
    from matplotlib.figure import Figure

    s = x = None
    if signal is not None and observation is not None:
        s = np.asarray(signal, dtype=np.float32).ravel()
        x = np.asarray(observation, dtype=np.float32).ravel()
    lv = _levels(model, s, levels)
    fig = Figure(figsize=figsize, layout="constrained")
    gs = fig.add_gridspec(2, len(lv))
    rng = np.random.default_rng(0)
    for k, level in enumerate(lv):
        ax = fig.add_subplot(gs[0, k])
        _, sd = model_moments(model, [level])
        sd = float(sd[0]) if np.isfinite(sd[0]) and sd[0] > 0 else 1.0
        s_win = np.array([level])
        if s is not None:
            # pairs whose signal is within a quarter noise std of the level (at most 50k of them)
            sel = np.flatnonzero(np.abs(s - level) <= 0.25 * sd)
            if sel.size > 50_000:
                sel = rng.choice(sel, 50_000, replace=False)
            if sel.size >= 20:
                xs_emp = x[sel]
                ax.hist(xs_emp, bins=min(80, max(10, sel.size // 50)), density=True, color="0.75",
                        label=f"data ({sel.size:,} px)")
                s_win = s[sel[:200]]
        grid = np.linspace(level - 5 * sd, level + 5 * sd, 400)
        ax.plot(grid, _mixture_density(model, s_win, grid), "C0", label=model.kind)
        if histogram is not None:
            ax.plot(grid, _mixture_density(histogram, s_win, grid), "C1--", label="histogram")
        ax.set_title(f"p(x | s = {level:.4g})", fontsize=9)
        ax.set_xlabel("observation x")
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[1, :])
    binned = None
    if s is not None:
        binned = binned_statistics(None, s, x, signal_range=getattr(model, "signal_range", None))
    elif isinstance(getattr(model, "info", {}).get("binned"), dict):
        binned = model.info["binned"]
    lo, hi = getattr(model, "signal_range", (min(lv), max(lv)))
    grid = np.linspace(lo, hi, 200)
    if binned is not None:
        bs = np.asarray(binned["signal"], float)
        be = np.array([np.nan if v is None else v for v in binned["empirical_std"]], float)
        ok = np.asarray(binned["count"]) >= MIN_BIN_COUNT
        ax.plot(bs[ok], be[ok], "ko", ms=4, label="data (per signal bin)")
    ax.plot(grid, model_moments(model, grid)[1], "C0", label=f"{model.kind} model")
    if histogram is not None:
        ax.plot(grid, model_moments(histogram, grid)[1], "C1--", label="histogram model")
    floor = getattr(model, "min_variance", None)
    if floor is not None:
        ax.axhline(math.sqrt(floor), color="C3", ls=":", lw=1, label="variance floor (as std)")
    ax.set_xlabel("signal s")
    ax.set_ylabel("noise std of x given s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    info = getattr(model, "info", {}) or {}
    title = "noise model fit"
    if "verdict" in info:
        title += f": {info['verdict']}"
    if info.get("heldout_nll") is not None:
        title += f" (held-out NLL {info['heldout_nll']:.4f}"
        if info.get("heldout_nll_histogram") is not None:
            title += f", histogram {info['heldout_nll_histogram']:.4f}"
        title += " nats/px)"
    fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write a figure from :func:`diagnostics_figure` as PNG (no pyplot, no display needed),
    atomically (see :func:`~napari_hdn.engine.files.safeio.atomic_write`)."""
    from ..files.safeio import atomic_write

    fmt = Path(os.fspath(path)).suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), "figure")
