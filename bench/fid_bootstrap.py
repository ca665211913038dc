"""The fid stage's per-run bootstrap (metrics.uncertainty.bootstrap: 200 resamples of the sample
feature rows against the fixed reference statistics) against the Inception pass it follows, at
paper size: n = 50,000 samples x d = 2048 pool3 features. Target: the bootstrap costs at most 10%
of the stage, bootstrap / (bootstrap + Inception pass) <= 0.10.

  (a) old: the direct numpy float64 loop the bootstrap ran before uncertainty.Resampler (a copy,
      `old_loop`): per resample the reweighted rows' covariance, A S A, eigvalsh;
  (b) new: uncertainty.Resampler on --device, float64: its setup (centre, project onto
      sqrt(sigma2), once) plus its per-resample values;
  (c) the Inception pass: torch-fidelity's inception-v3-compat extractor (layers "2048" and
      "logits_unbiased", as the stage asks) with RANDOM weights (no network: the architecture built
      with its weight download short-circuited, the state dict saved to a temp file and loaded back
      the way the stage loads a weights file; time does not depend on the weights), on --image px
      uint8 RGB batches of --batch (the stage's sample.fid_batch, 200 by default) moved to --device
      the way metrics.fid.extract does, in exact fp32 (metrics.fid.exact_fp32: no TF32).

(a) and (b) time --measure resamples (after one warm-up resample) and extrapolate x --resamples;
(c) times --batches batches (after one warm-up batch) and extrapolates the per-image time x --n.
Each extrapolation is marked "x N" in the table. The features are synthetic (post-ReLU rows of a
random correlated Gaussian): the time does not depend on their values.

Flop estimates (n+ = n (1 - (1 - 1/n)^n) ~ 0.632 n rows drawn at least once), printed for the sizes run:
  old per resample   2 n d^2 (scatter of all n weighted rows, a gemm) + 4 d^3 (A S A) + ~4/3 d^3 (eigvalsh)
  new once           2 n d^2 (Z = (X - mean) A) + ~9 d^3 (eigh of sigma2, as before)
  new per resample   n+ d^2 (syrk, CPU) or 2 n+ d^2 (torch matmul, CUDA) + ~4/3 d^3 (eigvalsh)
  Inception          11.4 GFLOP per image (our count of torch-fidelity's Inception-v3 at 299 px)
At n = 50,000, d = 2048: old 4.6e11 per resample (9.3e13 per 200); new 1.4e11 (CPU) or 2.8e11
(CUDA) per resample (2.9e13 / 5.5e13 per 200) + 4.3e11 once; Inception pass 5.7e14.

  python bench/fid_bootstrap.py                      # paper size on the default device (CUDA when present)
  python bench/fid_bootstrap.py --n 5000 --resamples 3 --measure 2 --batch 16 --batches 1   # a quick check
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meanflow import runtime  # noqa: E402
from meanflow.metrics import fid, uncertainty  # noqa: E402

INCEPTION_FLOP = 11.4e9   # per image, torch-fidelity inception-v3-compat at 299 x 299


def old_loop(f: np.ndarray, fd: uncertainty.Frechet, weights) -> list[float]:
    """The bootstrap's loop before uncertainty.Resampler (numpy float64, CPU)."""
    n, out = len(f), []
    for w in weights:
        mu = w @ f / n
        xc = f - mu
        out.append(fd(mu, (xc * w[:, None]).T @ xc / (n - 1)) if n >= f.shape[1] else fd.of_rows(mu, xc, w))
    return out


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Float32 post-ReLU rows of a correlated Gaussian (a random d x d mixing, decaying scales)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.arange(1, d + 1).pow(-0.75)[:, None] / d ** 0.5
    return torch.relu(torch.randn(n, d, generator=g) @ mix + 0.3 + shift).numpy()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def inception(dev: torch.device, tmp: Path):
    """torch-fidelity's inception-v3-compat with random weights (meanflow.rehearsal's stand-in),
    built as metrics.fid.Space builds it."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor
    from meanflow.rehearsal import random_inception
    weights = random_inception(tmp / "inception_random.pth")
    layers = ["2048", FEATURE_EXTRACTORS_REGISTRY["inception-v3-compat"].get_default_feature_layer_for_metric("isc")]
    return create_feature_extractor("inception-v3-compat", layers, cuda=False, verbose=False,
                                    feature_extractor_weights_path=str(weights)).to(dev)


@torch.inference_mode()
def time_inception(dev: torch.device, batch: int, batches: int, image: int) -> float:
    """Seconds per image of the Inception forward on uint8 batches (host -> device as the stage)."""
    with tempfile.TemporaryDirectory() as tmp:
        fe = inception(dev, Path(tmp))
    x = torch.randint(0, 256, (batch, 3, image, image), dtype=torch.uint8)
    with fid.exact_fp32():
        fe(x.to(dev))   # warm-up (cuDNN algorithm choice, allocator)
        sync(dev)
        t = time.perf_counter()
        for _ in range(batches):
            f, lg = fe(x.to(dev))
            f.double().cpu(), lg.float().cpu()
        sync(dev)
    return (time.perf_counter() - t) / (batches * batch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="sample feature rows (the stage's sample count)")
    p.add_argument("--d", type=int, default=2048, help="feature dimension (Inception pool3: 2048)")
    p.add_argument("--resamples", type=int, default=uncertainty.RESAMPLES, help="bootstrap resamples extrapolated to")
    p.add_argument("--measure", type=int, default=3, help="resamples timed for (a) and (b), after one warm-up")
    p.add_argument("--device", default="auto", help="the stage's device: auto | cpu | cuda[:k]")
    p.add_argument("--batch", type=int, default=200, help="Inception batch (sample.fid_batch; 200 by default)")
    p.add_argument("--batches", type=int, default=3, help="Inception batches timed, after one warm-up")
    p.add_argument("--image", type=int, default=256, help="image side in px (uint8 RGB)")
    p.add_argument("--skip-old", action="store_true", help="do not time (a), the old numpy loop")
    args = p.parse_args(argv)
    dev = runtime.device(args.device, "--device")
    n, d, R, k = args.n, args.d, args.resamples, args.measure
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"fid-stage bootstrap vs Inception pass: n = {n}, d = {d}, {R} resamples; device {dev} ({name})")

    f = features(n, d, 1)
    r = features(max(2 * d, 4096), d, 2, 0.05).astype(np.float64)
    mu2, s2 = r.mean(0), np.cov(r, rowvar=False)
    weights = np.random.default_rng(uncertainty.SEED).multinomial(n, np.full(n, 1.0 / n), size=k + 1)
    nplus = float(np.mean([np.count_nonzero(w) for w in weights]))
    rows = []   # (part, measured, per unit, extrapolated seconds or None, note)

    x = torch.ones(64, 64, dtype=torch.float64, device=dev)   # the stage has its device warm: BLAS / solver handles
    torch.linalg.eigvalsh(x @ x + torch.eye(64, dtype=torch.float64, device=dev))
    sync(dev)
    old = None
    if not args.skip_old:
        t = time.perf_counter()
        f64, fd = f.astype(np.float64), uncertainty.Frechet(mu2, s2)
        old_setup = time.perf_counter() - t
        old_loop(f64, fd, weights[:1])
        t = time.perf_counter()
        ref = old_loop(f64, fd, weights[1:])
        per = (time.perf_counter() - t) / k
        old = old_setup + per * R
        rows.append(("(a) old numpy loop (CPU): setup", "once", f"{old_setup:.3f} s", old_setup, "once"))
        rows.append(("(a) old numpy loop (CPU): resamples", f"{k} resamples", f"{per:.3f} s/resample", per * R, f"x {R}"))
        del f64

    t = time.perf_counter()
    rs = uncertainty.Resampler(f, mu2, s2, dev)
    sync(dev)
    setup = time.perf_counter() - t
    rs.values(weights[:1])
    sync(dev)
    t = time.perf_counter()
    got = rs.values(weights[1:])
    per = (time.perf_counter() - t) / k
    rows.append(("(b) new Resampler: setup", "once", f"{setup:.3f} s", setup, "once"))
    rows.append(("(b) new Resampler: resamples", f"{k} resamples", f"{per:.3f} s/resample", per * R, f"x {R}"))
    new = setup + per * R
    if nplus >= d:   # the eigvalsh alone, for the breakdown
        m = torch.stack([rs._product(rs.z[: int(nplus)].contiguous(), False) for _ in range(min(k, 4))])
        torch.linalg.eigvalsh(m[:1])
        sync(dev)
        t = time.perf_counter()
        torch.linalg.eigvalsh(m)
        sync(dev)
        eig = (time.perf_counter() - t) / len(m)
        rows.append(("    of which eigvalsh d x d", f"{len(m)} matrices", f"{eig:.3f} s/resample", eig * R, f"x {R}"))
        if dev.type != "cpu":   # the same eigvalsh on the host, for comparison (not part of the total)
            mc = m.cpu()
            t = time.perf_counter()
            torch.linalg.eigvalsh(mc)
            eig = (time.perf_counter() - t) / len(m)
            rows.append(("    (eigvalsh on the CPU instead)", f"{len(m)} matrices", f"{eig:.3f} s/resample", eig * R,
                         f"x {R}, not in the total"))
        del m
    del rs

    per_img = time_inception(dev, args.batch, args.batches, args.image)
    inc = per_img * n
    rows.append(("(c) Inception pass", f"{args.batches} x {args.batch} images", f"{per_img * 1e3:.2f} ms/image", inc, f"x {n}"))

    w = max(len(r[0]) for r in rows)
    print(f"{'part':<{w}}  {'measured':<20} {'per unit':<20} {'extrapolated':>14}")
    for part, meas, unit, total, note in rows:
        print(f"{part:<{w}}  {meas:<20} {unit:<20} {total:>12.2f} s  ({note})")
    print(f"bootstrap total: new {new:.2f} s" + (f", old {old:.2f} s (old / new {old / new:.1f}x)" if old else ""))
    share = "  ".join(f"{lab} {b / (b + inc):.1%}" for lab, b in (("old", old), ("new", new)) if b is not None)
    print(f"bootstrap share of the stage, bootstrap / (bootstrap + Inception pass): {share}  (target <= 10%)")
    if old is not None:
        diff = np.abs(np.array(got) - np.array(ref))
        print(f"new vs old values ({k} resamples): max abs diff {diff.max():.2e}, max rel {(diff / np.abs(ref)).max():.2e}")
    fo = 2 * n * d ** 2 + 4 * d ** 3 + 4 / 3 * d ** 3
    fn = (1 if dev.type == "cpu" else 2) * nplus * d ** 2 + 4 / 3 * d ** 3
    print(f"flop estimates: old {fo:.2e}/resample ({fo * R:.2e} per {R}); new {fn:.2e}/resample ({fn * R:.2e} per {R}) "
          f"+ {2 * n * d ** 2 + 9 * d ** 3:.2e} once (n+ = {nplus:.0f} drawn rows); "
          f"Inception pass {INCEPTION_FLOP * n:.2e}")


if __name__ == "__main__":
    main()
