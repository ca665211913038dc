"""Noise of a reported number, from its two sources: the metric's sampling noise within one run (a
bootstrap over the generated samples' feature rows against the fixed reference statistics) and
the spread over training seeds (replicates). Plus the two tests built on them: an ordering across
rows (Welch's t-test over seeds) and a consistency verdict between two result sets.

Why these tests. With R = 3 seeds a bootstrap over seeds has only 10 distinct resamples, too
coarse for a p-value; Welch's t-test uses the t distribution's small-sample tails and does not
assume the rows share a variance (flow matching's FID varies far more than MeanFlow's). The
per-run bootstrap resamples feature rows (not seeds), so it measures only the finite-sample noise
of the metric; its interval is the basic (reverse-percentile) one, because a Frechet distance of
a resample is biased upward (duplicated rows shrink the covariance's rank) and the basic interval
reflects that bias around the point estimate instead of shifting it."""
from __future__ import annotations

import math

import numpy as np

RESAMPLES, SEED, LEVEL = 200, 0, 0.95   # fixed: the bootstrap is reproducible and part of the metric's record
ALPHA = 0.05                          # orderings: one-sided Welch p < ALPHA; compare: two-sided Welch p >= ALPHA


# --------------------------------------------------------------------------- per run: bootstrap
class Frechet:
    """Frechet distance to fixed reference statistics (mu2, sigma2), with sqrt(sigma2) computed once:
    tr sqrt(S1 S2) = sum sqrt(eig(A S1 A)), A = sqrt(S2) symmetric, so each resample costs one eigvalsh."""

    def __init__(self, mu2, sigma2):
        self.mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
        w, v = np.linalg.eigh((s2 + s2.T) / 2)
        self.a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.tr2 = float(np.trace(s2))

    def __call__(self, mu1, sigma1) -> float:
        m = self.a @ np.asarray(sigma1, np.float64) @ self.a
        return self._value(mu1, np.trace(sigma1), np.linalg.eigvalsh((m + m.T) / 2))

    def of_rows(self, mu1, xc, w) -> float:
        """The distance of n weighted centred rows xc (weights w summing to n), covariance
        S1 = xc^T diag(w) xc / (n - 1), for n < d: A S1 A = B^T B (B = sqrt(w / (n - 1)) xc A) has
        rank < n and the nonzero eigenvalues of the n x n Gram matrix B B^T. n^2 d work, not d^3
        (12 Inception rows: 2048^3), and no rounding noise of d - n zero eigenvalues under the sqrt."""
        b = (np.sqrt(w / (len(xc) - 1))[:, None] * xc) @ self.a
        return self._value(mu1, float(w @ np.einsum("ij,ij->i", xc, xc)) / (len(xc) - 1), np.linalg.eigvalsh(b @ b.T))

    def _value(self, mu1, tr1, ev) -> float:
        d = np.asarray(mu1, np.float64) - self.mu2
        return float(d @ d + tr1 + self.tr2 - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def bootstrap(features: np.ndarray, mu2, sigma2, value: float, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """`resamples` Frechet distances of feature rows drawn with replacement (multinomial weights,
    float64), and the basic 95% interval around `value` (the full-sample distance). Fewer rows than
    features (a smoke test's few Inception rows) take the Gram path, `Frechet.of_rows`."""
    f = np.asarray(features, np.float64)
    n = len(f)
    fd, rng = Frechet(mu2, sigma2), np.random.default_rng(seed)
    values = []
    for w in rng.multinomial(n, np.full(n, 1.0 / n), size=resamples):
        mu = w @ f / n
        xc = f - mu
        values.append(fd(mu, (xc * w[:, None]).T @ xc / (n - 1)) if n >= f.shape[1] else fd.of_rows(mu, xc, w))
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"resamples": resamples, "seed": seed, "level": LEVEL, "method": "basic bootstrap over sample feature rows "
            "(multinomial weights) against the fixed reference statistics",
            "ci95": [2 * value - float(hi), 2 * value - float(lo)], "se": float(np.std(values, ddof=1)),
            "values": [round(v, 6) for v in values]}


# --------------------------------------------------------------------------- across seeds
def summary(values) -> dict:
    """mean, sample std (ddof 1; None with one value) and n of the values that exist."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    n = len(v)
    return {"mean": sum(v) / n if n else None, "std": float(np.std(v, ddof=1)) if n > 1 else None, "n": n}


def welch(a, b, alternative: str = "two-sided") -> float | None:
    """Welch's t-test p-value of mean(a) vs mean(b) (alternative 'greater': mean(a) > mean(b)); None
    when a side has one value. Equal values on both sides (zero variance) give p = 1 or 0 by the means."""
    from scipy import stats
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return None
    if np.var(a) == 0 and np.var(b) == 0:
        d = np.mean(a) - np.mean(b)
        hit = {"two-sided": d != 0, "greater": d > 0, "less": d < 0}[alternative]
        return 0.0 if hit else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def ordering(worse, better) -> dict:
    """Does `better` have the lower metric than `worse`? One-sided Welch over seeds: `holds` (p < ALPHA),
    `reversed` (the opposite one-sided test rejects), else `not significant`."""
    sw, sb = summary(worse), summary(better)
    if not sw["n"] or not sb["n"]:
        return {"verdict": "missing", "p": None}
    p = welch(worse, better, "greater")
    if p is None:
        holds = sw["mean"] > sb["mean"]
        return {"verdict": ("holds" if holds else "does not hold") + " (one seed: no test)", "p": None}
    if p < ALPHA:
        return {"verdict": "holds", "p": p}
    if welch(worse, better, "less") < ALPHA:
        return {"verdict": "reversed", "p": p}
    return {"verdict": "not significant", "p": p}


RULE = (f"`consistent` when Welch's two-sided t-test over the seeds of A and B does not reject equal means "
        f"at p < {ALPHA} (the seed spread already contains each run's sampling noise); `differs` otherwise; "
        f"`no noise estimate` when a side has one seed")


def verdict(a, b) -> tuple[str, float | None]:
    """Compare's verdict for one row: consistent / differs / no noise estimate (see RULE)."""
    p = welch(a, b)
    if p is None:
        return "no noise estimate", None
    return ("consistent" if p >= ALPHA else "differs"), p
