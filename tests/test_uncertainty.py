"""Noise estimates: the bootstrap's Frechet distance equals torch-fidelity's, its interval covers
the truth at about the stated rate on Gaussians of known distance; Welch orderings and compare
verdicts on synthetic seeds of known truth; replicates in the plan."""
import numpy as np
import pytest

from meanflow import config, plan
from meanflow.metrics import frechet, uncertainty as U


def test_fast_frechet_equals_torch_fidelity():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 12)), rng.normal(0.3, 1.2, size=(500, 12)) @ rng.normal(size=(12, 12))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    assert U.Frechet(mu2, s2)(mu1, s1) == pytest.approx(frechet(mu1, s1, mu2, s2), rel=1e-7)


def test_fewer_rows_than_features_gram_path_equals_the_covariance_path():
    """n < d (a smoke run's 12 Inception rows): the n x n Gram path gives the d x d path's distance,
    resample weights (zeros, repeats) included; the bootstrap takes it and keeps its values."""
    rng = np.random.default_rng(3)
    n, d = 12, 300
    f, y = rng.normal(size=(n, d)), rng.normal(0.2, 1.0, size=(2 * d, d)) @ rng.normal(size=(d, d)) / d ** 0.5
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    fd = U.Frechet(mu2, s2)
    eye = U.Frechet(mu2, np.eye(d))   # A = I: tr sqrt(S1) is the sum of sqrt(w / (n - 1)) xc's singular values
    for w in [np.ones(n), *rng.multinomial(n, np.full(n, 1 / n), size=3)]:
        mu = w @ f / n
        xc = f - mu
        full = fd(mu, (xc * w[:, None]).T @ xc / (n - 1))
        assert fd.of_rows(mu, xc, w.astype(float)) == pytest.approx(full, rel=1e-7)
        sv = np.linalg.svd(np.sqrt(w / (n - 1))[:, None] * xc, compute_uv=False)
        exact = (mu - mu2) @ (mu - mu2) + (sv ** 2).sum() + d - 2 * sv.sum()
        gram, cov = eye.of_rows(mu, xc, w.astype(float)), eye(mu, (xc * w[:, None]).T @ xc / (n - 1))
        assert abs(gram - exact) <= 1e-9 * exact and abs(gram - exact) <= abs(cov - exact)   # the rounding noise is the d x d path's
    assert fd.of_rows(f.mean(0), f - f.mean(0), np.ones(n)) == pytest.approx(frechet(f.mean(0), np.cov(f, rowvar=False), mu2, s2), rel=1e-7)
    b = U.bootstrap(f, mu2, s2, 1.0, resamples=20)
    ws = np.random.default_rng(U.SEED).multinomial(n, np.full(n, 1 / n), size=20)
    want = [fd((w @ f) / n, ((f - w @ f / n) * w[:, None]).T @ (f - w @ f / n) / (n - 1)) for w in ws]
    np.testing.assert_allclose(b["values"], want, rtol=1e-6)


def _direct_loop(f, mu2, s2, weights):
    """The bootstrap's loop before uncertainty.Resampler (a copy): per resample the reweighted rows'
    covariance S_w (n d^2), then Frechet's A S_w A and eigvalsh; Frechet.of_rows when n < d."""
    f = np.asarray(f, np.float64)
    n, fd, out = len(f), U.Frechet(mu2, s2), []
    for w in weights:
        mu = w @ f / n
        xc = f - mu
        out.append(fd(mu, (xc * w[:, None]).T @ xc / (n - 1)) if n >= f.shape[1] else fd.of_rows(mu, xc, w))
    return np.array(out)


def _inception_like(rng, n, d, decay=1.5, shift=0.0):
    """Float32 post-ReLU rows of a Gaussian with a power-law spectrum (k^-decay) in a random basis:
    skewed, correlated, full rank with a spread of small eigenvalues, as pool3 features are."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    g = (rng.normal(size=(n, d)) * np.arange(1, d + 1) ** (-decay / 2)) @ q.T
    return np.maximum(g + 0.3 + shift, 0).astype(np.float32)


RTOL, ATOL = 1e-9, 1e-6   # Resampler vs the direct loop, per resample value (see the test below)


@pytest.mark.parametrize("n, d, decay", [(600, 256, 1.5), (600, 256, 3.0), (300, 256, 1.5), (200, 256, 1.5)])
def test_resampler_equals_the_direct_loop(n, d, decay):
    """Every resample's value equals the direct float64 loop's within RTOL relative + ATOL absolute,
    and so do the record's se and ci95. Measured: <= 4e-13 relative where each resample's
    covariance has full rank (n = 600, d = 256); n = 300 (>= d, but fewer drawn rows than features:
    the Gram path here, the old d x d path there) and n = 200 (< d: both Gram) differ by <= 1e-7
    absolute, the rounding noise of the zero eigenvalues under the old path's sqrt. Without the
    re-centring at each resample's mean (the rank-1 term), the values move by far more than the
    tolerance: the comparison would fail."""
    rng = np.random.default_rng(n + d)
    f = _inception_like(rng, n, d, decay)
    r = _inception_like(np.random.default_rng(7), 4 * d, d, decay, 0.05).astype(np.float64)
    mu2, s2 = r.mean(0), np.cov(r, rowvar=False)
    value = U.Frechet(mu2, s2)(f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False))
    b = U.bootstrap(f, mu2, s2, value, resamples=20)
    ws = np.random.default_rng(U.SEED).multinomial(n, np.full(n, 1 / n), size=20)   # the same draws
    want = _direct_loop(f, mu2, s2, ws)
    got = np.array(U.Resampler(f, mu2, s2).values(ws))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(b["values"], np.round(want, 6), rtol=0, atol=1e-6 + ATOL)
    lo, hi = np.quantile(want, [0.025, 0.975])
    np.testing.assert_allclose(b["ci95"], [2 * value - hi, 2 * value - lo], rtol=RTOL, atol=ATOL)
    assert b["se"] == pytest.approx(np.std(want, ddof=1), rel=1e-6, abs=ATOL)
    assert set(b) == {"resamples", "seed", "level", "method", "ci95", "se", "values"} and b["resamples"] == 20
    # the tolerance detects a missing mean correction: covariance about the full sample's mean
    f64 = f.astype(np.float64)
    fd, xc = U.Frechet(mu2, s2), f64 - f64.mean(0)
    uncentred = np.array([fd(w @ f64 / n, (xc * w[:, None]).T @ xc / (n - 1)) for w in ws])
    assert (np.abs(uncentred - want) > 10 * (ATOL + RTOL * np.abs(want))).all()


def test_resampler_devices():
    """device None, 'cpu' and torch.device('cpu') give the same values; CUDA (when present) within
    the tolerance; float64 input rows are not modified."""
    import torch
    rng = np.random.default_rng(5)
    f = _inception_like(rng, 300, 64).astype(np.float64)
    keep = f.copy()
    r = _inception_like(np.random.default_rng(6), 256, 64, shift=0.05).astype(np.float64)
    mu2, s2 = r.mean(0), np.cov(r, rowvar=False)
    ws = np.random.default_rng(0).multinomial(300, np.full(300, 1 / 300), size=10)
    base = U.Resampler(f, mu2, s2).values(ws)
    assert U.Resampler(f, mu2, s2, "cpu").values(ws) == base == U.Resampler(f, mu2, s2, torch.device("cpu")).values(ws)
    np.testing.assert_array_equal(f, keep)
    np.testing.assert_allclose(base, _direct_loop(f, mu2, s2, ws), rtol=RTOL, atol=ATOL)
    assert U.Resampler(f, mu2, s2).values(ws[:0]) == []
    for n in (300, 40):   # torch's matmul (the CUDA branch) in place of numpy's syrk: both paths
        mm = U.Resampler(f[:n], mu2, s2)
        mm.syrk = False
        w = np.random.default_rng(1).multinomial(n, np.full(n, 1 / n), size=4)
        np.testing.assert_allclose(mm.values(w), U.Resampler(f[:n], mu2, s2).values(w), rtol=RTOL, atol=ATOL)
    if torch.cuda.is_available():
        np.testing.assert_allclose(U.Resampler(f, mu2, s2, "cuda").values(ws), base, rtol=RTOL, atol=ATOL)


def test_bootstrap_interval_covers_the_truth():
    """Samples of N(delta, I) in d dims against the exact reference N(0, I): the Frechet distance of
    infinitely many samples is |delta|^2. The basic 95% interval covers it in most of 20 draws,
    and its width shrinks as the sample count grows (the noise is the metric's, not a constant)."""
    d, delta = 4, np.full(4, 0.5)
    truth, covered, widths = float(delta @ delta), 0, {}
    for n in (200, 1600):
        for s in range(20 if n == 200 else 3):
            f = np.random.default_rng(s).normal(size=(n, d)) + delta
            value = U.Frechet(np.zeros(d), np.eye(d))(f.mean(0), np.cov(f, rowvar=False))
            b = U.bootstrap(f, np.zeros(d), np.eye(d), value, resamples=100, seed=s)
            assert len(b["values"]) == 100 and b["ci95"][0] < value < b["ci95"][1]
            if n == 200:
                covered += b["ci95"][0] <= truth <= b["ci95"][1]
            widths.setdefault(n, []).append(b["ci95"][1] - b["ci95"][0])
    assert covered >= 16
    assert np.mean(widths[1600]) < 0.6 * np.mean(widths[200])


def test_orderings_with_known_truth():
    rng = np.random.default_rng(0)
    worse, better = list(60 + rng.normal(0, 1, 3)), list(40 + rng.normal(0, 1, 3))
    r = U.ordering(worse, better)
    assert r["verdict"] == "holds" and r["p"] < 0.01
    assert U.ordering(better, worse)["verdict"] == "reversed"
    noisy = U.ordering([52, 72, 32], [48, 52, 50])   # means ordered, the spread swamps it
    assert noisy["verdict"] == "not significant" and noisy["p"] > 0.05
    assert U.ordering([60], [40])["verdict"] == "holds (one seed: no test)"
    assert U.ordering([], [40])["verdict"] == "missing"
    assert U.summary([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert U.summary([5.0])["std"] is None


def test_compare_verdicts_with_known_truth():
    """Same distribution on both sides -> consistent in most draws (false alarms about 5%); a
    shift of 10 std -> differs; one seed -> no noise estimate."""
    rng = np.random.default_rng(3)
    same = [U.verdict(list(rng.normal(90, 2, 3)), list(rng.normal(90, 2, 3)))[0] for _ in range(200)]
    assert 0.88 <= same.count("consistent") / 200 < 1.0
    shifted = [U.verdict(list(rng.normal(90, 2, 3)), list(rng.normal(110, 2, 3)))[0] for _ in range(50)]
    assert shifted.count("differs") >= 45
    assert U.verdict([96.5], [93.5]) == ("no noise estimate", None)


def test_replicates_keep_run_ids_and_differ_only_in_seeds():
    params = config.load_params()
    params["tiers"]["tiny"]["train"].pop("replicates", None)
    one = plan.Plan(params, "tiny")
    params["tiers"]["tiny"]["train"]["replicates"] = 3
    params["experiments"]["ratio_0"] = {"meanflow": {"ratio": 0.0}, "train": {"replicates": 2}}
    three = plan.Plan(params, "tiny")
    rows1, rows3 = {r.row: r for r in one.rows}, {r.row: r for r in three.rows}
    for name, r in rows3.items():   # replica 0 is the run of R = 1: same id, same params hash
        assert r.run_id == rows1[name].run_id and r.cfg.params_hash == rows1[name].cfg.params_hash
    r = rows3["ratio_25"]
    assert len(set(r.run_ids)) == 3 and len(rows3["ratio_0"].run_ids) == 2   # the experiment's override
    assert [c.train.seed for c in r.replicas] == [0, 1, 2] and [c.sample.seed for c in r.replicas] == [0, 1, 2]
    for c in r.replicas[1:]:
        a, b = dict(c.raw), dict(r.cfg.raw)
        a["train"], b["train"] = {**a["train"], "seed": 0}, {**b["train"], "seed": 0}
        a["sample"], b["sample"] = {**a["sample"], "seed": 0}, {**b["sample"], "seed": 0}
        assert a == b
    assert len(three.runs) == 3 * len(one.runs) - 1
    params["tiers"]["tiny"]["train"]["replicates"] = 0
    with pytest.raises(config.ConfigError, match="train.replicates: 0 is less than the minimum of 1"):
        plan.Plan(params, "tiny")
    with pytest.raises(config.ConfigError, match="replicate 3"):
        plan.replica(config.resolve(params, "tiny", "ratio_0"), 3)
