"""MMSE error against the number of samples, per latent-noise scheme, on trained models.

    python -m benchmarks.mmse_models --out /tmp/speed-models      # once: train the models
    python -m benchmarks.mmse_quality --models /tmp/speed-models --crop 128

For each model ``<models>/*.hdn`` (with its test image ``*.npz``: noisy and clean) a reference MMSE
of ``--ref`` (1000) independent samples is drawn (its own seed); then for each scheme
(``independent``, ``antithetic``, ``stratified``) and ``--reps`` seeds, the MMSE of the first N
samples for N in ``--ns``. Printed per scheme and N: the mean squared difference to the reference
MMSE (in the image's units, averaged over pixels and seeds) and the PSNR against the clean image.

The error of N independent samples against the reference is V/N + V/1000 (V: the mean per-pixel
posterior variance). A scheme's efficiency is V / V_s where V_s = N * (error - V/1000), and
``N_eq = 100 V_s / V`` is the number of its samples that is as close to the reference as 100
independent samples. ``--tta`` also measures test-time augmentation: PSNR of the 8-orientation
average with 100/8 and 100 samples per orientation against 100 samples of one orientation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SCHEMES = ("independent", "antithetic", "stratified")


def psnr(x, clean) -> float:
    rng = float(clean.max() - clean.min())
    return float(10 * np.log10(rng**2 / np.mean((x - clean) ** 2)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="/tmp/speed-models")
    ap.add_argument("--pattern", default="*.hdn")
    ap.add_argument("--crop", type=int, default=128, help="centre crop of the test image")
    ap.add_argument("--ref", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ns", default="4,8,16,24,32,48,64,100")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    import torch

    from napari_hdn.engine import load_model, predict

    torch.set_num_threads(a.threads)
    ns = [int(n) for n in a.ns.split(",")]
    nmax = max(ns)
    out = {}
    for path in sorted(Path(a.models).glob(a.pattern)):
        t0 = time.perf_counter()
        model = load_model(path)
        d = np.load(path.with_suffix(".npz"))
        c = a.crop
        y, x = (d["noisy"].shape[0] - c) // 2, (d["noisy"].shape[1] - c) // 2
        noisy, clean = d["noisy"][y:y + c, x:x + c], d["clean"][y:y + c, x:x + c]
        ref = predict(model, noisy, a.ref, seed=10**6, sampling="independent")
        V = float(ref.variance.mean())
        rec = {"V": V, "psnr_ref": psnr(ref.mmse, clean), "schemes": {}}
        print(f"{path.name}: {c}x{c} crop, reference {a.ref} samples PSNR {rec['psnr_ref']:.2f} "
              f"dB, mean posterior variance V = {V:.4g}", flush=True)
        for scheme in a.schemes.split(","):
            err = {n: [] for n in ns}
            ps = {n: [] for n in ns}
            for r in range(a.reps):
                res = predict(model, noisy, nmax, seed=r, sampling=scheme, return_samples=True)
                cs = np.cumsum(res.samples.astype(np.float64), axis=0)
                for n in ns:
                    m = cs[n - 1] / n
                    err[n].append(float(np.mean((m - ref.mmse) ** 2)))
                    ps[n].append(psnr(m, clean))
            rows = {}
            for n in ns:
                e = float(np.mean(err[n]))
                vs = max(n * (e - V / a.ref), 1e-30)
                rows[n] = {"err": e, "psnr": float(np.mean(ps[n])), "efficiency": V / vs}
            rec["schemes"][scheme] = rows
        base = rec["schemes"].get("independent", {}).get(100)
        for scheme, rows in rec["schemes"].items():
            effs = [rows[n]["efficiency"] for n in ns if n >= 16]
            eff = float(np.median(effs))
            n_eq = 100 / eff
            rec["schemes"][scheme]["summary"] = {"efficiency": eff, "n_eq": n_eq}
            line = "  ".join(f"N={n}: {rows[n]['err']:.3g} ({rows[n]['psnr']:.2f} dB)" for n in ns)
            print(f"  {scheme:11s} error vs reference (PSNR vs clean): {line}")
            msg = f"  {scheme:11s} efficiency {eff:.2f} (N >= 16) -> N_eq {n_eq:.0f} samples"
            if base:
                ok = [n for n in ns if rows[n]["err"] <= base["err"]]
                msg += (f"; smallest N measured with error <= independent N=100: "
                        f"{min(ok) if ok else 'none'}")
            print(msg, flush=True)
        if a.tta:
            few = max(2, round(100 / 8 / 2) * 2)
            t1 = predict(model, noisy, 100, seed=0)
            t8f = predict(model, noisy, few, seed=0, tta=True)
            t8 = predict(model, noisy, 100, seed=0, tta=True)
            rec["tta"] = {"psnr_100": psnr(t1.mmse, clean), f"psnr_tta_{few}": psnr(t8f.mmse, clean),
                          "psnr_tta_100": psnr(t8.mmse, clean)}
            print(f"  TTA (default scheme): 100 samples {rec['tta']['psnr_100']:.2f} dB; 8 "
                  f"orientations x {few} samples {psnr(t8f.mmse, clean):.2f} dB; 8 x 100 samples "
                  f"{psnr(t8.mmse, clean):.2f} dB", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        out[path.name] = rec
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
