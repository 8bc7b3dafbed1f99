"""Noise-model fitting and Noise2Void speed: ``python benchmarks/bench_noise_fit.py [--quick]``.

Prints
- the wall time of ``fit_noise_model`` (GMM, default settings: binned L-BFGS, held-out split,
  histogram comparison and diagnostics included) on 10 million (signal, observation) pairs of
  synthetic Poisson-Gaussian calibration data (gain 2, read noise 5, offset 100), median of
  ``--repeats`` runs, with the fitted std's error against the truth at a few signals;
- the same for the mini-batch Adam optimiser (one run);
- Noise2Void training throughput (steps/s and patches/s at the default network size) and tiled
  prediction throughput (megapixels/s);
- quality: held-out negative log-likelihood (nats/pixel) and std error vs the truth of GMM and
  histogram models fitted on calibration frames and bootstrapped from Noise2Void, all scored on the
  same independent frames of a static sample paired with its true signal (``--quality``).

Set ``--threads`` to the number of idle cores: oversubscribed threads slow torch down by large
factors when another process is busy on the same cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from napari_hdn.engine.noise import (
    PoissonGaussianNoiseModel,
    bootstrap_pairs,
    fit_from_calibration,
    fit_noise_model,
    heldout_nll,
    pairs_from_calibration,
)
from napari_hdn.engine.noise.n2v import N2VConfig, train_n2v

GAIN, READ, OFFSET = 2.0, 5.0, 100.0


def calibration_stack(n_pairs: int, seed: int = 0) -> np.ndarray:
    """Frames of a static ramp-and-ripple sample (100 .. 1100 ADU) with Poisson-Gaussian noise."""
    side = 500
    frames = max(2, int(round(n_pairs / side**2)))
    yy, xx = np.mgrid[0:side, 0:side]
    clean = OFFSET + GAIN * 500.0 * (xx / (side - 1)) * (0.6 + 0.4 * np.cos(yy / 40.0))
    rng = np.random.default_rng(seed)
    stack = np.empty((frames, side, side), np.float32)
    for k in range(frames):
        stack[k] = rng.poisson((clean - OFFSET) / GAIN) * GAIN + OFFSET + rng.normal(0, READ, clean.shape)
    return stack


def std_errors(model, signals=(120.0, 200.0, 400.0, 700.0, 1000.0)) -> list[float]:
    s = torch.tensor(signals, dtype=torch.float32)
    with torch.no_grad():
        sd = model.moments(s)[1].numpy()
    truth = np.sqrt(GAIN * (np.asarray(signals) - OFFSET) + READ**2)
    return [float(v) for v in sd / truth - 1.0]


def bench_fit(n_pairs: int, repeats: int) -> None:
    pairs = pairs_from_calibration(calibration_stack(n_pairs))
    print(f"GMM fit on {len(pairs):,} pairs (K=3, degree 1, 10% held out, histogram comparison):")
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        m = fit_noise_model(pairs, seed=k)
        times.append(time.perf_counter() - t)
        fit = m.info["fit"]
        print(f"  run {k + 1}: {times[-1]:.2f} s ({fit['iterations']} L-BFGS iterations), held-out NLL "
              f"{m.info['heldout_nll']:.4f} (histogram {m.info['heldout_nll_histogram']:.4f}), "
              f"std error vs truth at 120/200/400/700/1000: "
              f"{', '.join(f'{e:+.2%}' for e in std_errors(m))}")
    print(f"  median: {statistics.median(times):.2f} s")
    t = time.perf_counter()
    m = fit_noise_model(pairs, method="minibatch", compare_histogram=False)
    print(f"  minibatch Adam ({m.info['fit']['iterations']} steps of 131072 pairs): "
          f"{time.perf_counter() - t:.2f} s, held-out NLL {m.info['heldout_nll']:.4f}, std error "
          f"{', '.join(f'{e:+.2%}' for e in std_errors(m))}")


def bench_n2v(steps: int) -> None:
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    clean = np.stack([ndi.gaussian_filter(rng.normal(size=(256, 256)), 3) for _ in range(4)])
    clean = 100 + 1000 * (clean - clean.min()) / (clean.max() - clean.min())
    noisy = (rng.poisson(clean / 2) * 2 + rng.normal(0, 5, clean.shape)).astype(np.float32)
    cfg = N2VConfig(max_steps=steps)
    t = time.perf_counter()
    den = train_n2v(noisy, config=cfg, seed=0)
    dt = time.perf_counter() - t
    print(f"Noise2Void (depth {cfg.depth}, {cfg.filters} filters, batch {cfg.batch_size} x "
          f"{cfg.patch_size}^2): {steps} steps in {dt:.1f} s = {steps / dt:.2f} steps/s, "
          f"{steps * cfg.batch_size / dt:.1f} patches/s")
    big = np.tile(noisy[0], (4, 4))  # 1024 x 1024
    den.predict(big[:256, :256])
    t = time.perf_counter()
    den.predict(big)
    dt = time.perf_counter() - t
    print(f"  tiled prediction of {big.shape[0]}x{big.shape[1]}: {dt:.2f} s = "
          f"{big.size / dt / 1e6:.2f} Mpx/s")


def bench_quality(n2v_steps: int) -> None:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(1)

    def smooth(shape, seed, sigma):
        """Smooth random structures whose intensities are spread evenly over 0..1 (rank transform)."""
        g = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
        ranks = np.empty(g.size)
        ranks[np.argsort(g, axis=None)] = np.arange(g.size)
        return (ranks / (g.size - 1)).reshape(shape)

    def camera(clean, frames=None):
        shape = clean.shape if frames is None else (frames, *clean.shape)
        return (rng.poisson((clean - OFFSET) / GAIN, shape) * GAIN + OFFSET
                + rng.normal(0, READ, shape)).astype(np.float32)

    peak = 500.0  # photons: signals 100 .. 1100 ADU
    cal_clean = OFFSET + GAIN * peak * smooth((128, 128), 100, 6.0)
    cal = camera(cal_clean, 100)
    test = camera(cal_clean, 20)  # independent frames, scored against the true signal
    ev_s, ev_x = np.broadcast_to(cal_clean, test.shape).ravel(), test.ravel()
    noisy = camera(np.stack([OFFSET + GAIN * peak * smooth((256, 256), k, 4.0) for k in range(4)]))
    print(f"quality (gain {GAIN:g}, read noise {READ:g}, offset {OFFSET:g}; {cal.shape[0]} calibration "
          f"frames of 128x128; bootstrap from {noisy.shape[0]} noisy 256x256 images; scored on "
          f"{ev_s.size:,} independent pixels against the true signal):")
    rows = [("true Poisson-Gaussian", PoissonGaussianNoiseModel(GAIN, READ, OFFSET), None)]
    for kind in ("gmm", "histogram"):
        t = time.perf_counter()
        rows.append((f"calibration {kind}", fit_from_calibration(cal, kind=kind), time.perf_counter() - t))
    t = time.perf_counter()
    pairs = bootstrap_pairs(noisy, n2v={"max_steps": n2v_steps})
    t_n2v = time.perf_counter() - t
    for kind in ("gmm", "histogram"):
        t = time.perf_counter()
        m = fit_noise_model(pairs, kind=kind)
        rows.append((f"N2V bootstrap {kind}", m, time.perf_counter() - t))
    print(f"  (Noise2Void: {n2v_steps} steps + prediction in {t_n2v:.1f} s)")
    for name, m, secs in rows:
        err = ", ".join(f"{e:+.1%}" for e in std_errors(m))
        extra = f", fitted in {secs:.1f} s" if secs is not None else ""
        if getattr(m, "info", None):
            lo, hi = m.signal_range
            extra += f", range {lo:.0f}..{hi:.0f}, verdict {m.info['verdict']}"
            extra += "".join(f"\n      - {r}" for r in m.info["reasons"])
        print(f"  {name:22s} NLL {heldout_nll(m, ev_s, ev_x):.4f}; std error at "
              f"120/200/400/700/1000: {err}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=float, default=10e6, help="number of pairs (default 10 million)")
    ap.add_argument("--repeats", type=int, default=3, help="GMM fits to take the median of (default 3)")
    ap.add_argument("--n2v-steps", type=int, default=100, help="N2V training steps to time (default 100)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quality", action="store_true", help="also run the quality comparison")
    ap.add_argument("--skip-speed", action="store_true", help="skip the speed measurements")
    ap.add_argument("--quality-n2v-steps", type=int, default=1000,
                    help="N2V training steps for the bootstrap in the quality comparison (default 1000)")
    ap.add_argument("--quick", action="store_true", help="1 million pairs, 1 repeat, 20 N2V steps")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.pairs, a.repeats, a.n2v_steps = 1e6, 1, 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not a.skip_speed:
        bench_fit(int(a.pairs), a.repeats)
        bench_n2v(a.n2v_steps)
    if a.quality:
        bench_quality(a.quality_n2v_steps)


if __name__ == "__main__":
    main()
