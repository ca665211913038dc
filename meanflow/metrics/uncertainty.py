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


METHOD = ("basic bootstrap over sample feature rows (multinomial weights) against the fixed reference statistics; "
          "float64: rows centred at the full-sample mean and projected onto sqrt(sigma2) once, each resample's "
          "sqrt(sigma2) S sqrt(sigma2) from its drawn rows re-centred at the resample's mean (their Gram matrix "
          "when fewer rows are drawn than features)")


class Resampler:
    """Frechet distances of weighted resamples of feature rows X (n x d) against (mu2, sigma2), in
    float64 torch on `device` (the fid stage's; the CPU when None), the same values as the direct
    loop (S_w of the reweighted rows, then A S_w A, A = sqrt(sigma2)) within 1e-9 relative + 1e-6
    absolute (tests/test_uncertainty.py; measured <= 4e-13 relative where each resample's covariance
    has full rank, <= 1e-7 absolute where it has not: the old d x d path's zero-eigenvalue noise).

    Once: m = mean(X), Y = X - m, Z = Y A (2 n d^2 flops) and the rows' |y|^2. A resample of weights w
    (summing to n) has mean m + e, e = w Y / n, tr S_w = (w |y|^2 - n |e|^2) / (n - 1) and
    A S_w A = B^T B, B = the drawn rows (w > 0) of sqrt(w / (n - 1)) (Z - e A). Only the drawn rows
    enter (P(w = 0) = (1 - 1/n)^n ~ 1/e: ~63% of them), re-centred at the resample's own mean before
    the product (no cancellation, no rank-1 correction), in one symmetric product (numpy's syrk on the
    CPU, half a gemm's flops): ~0.63 n d^2 flops, then one d x d eigvalsh (~4/3 d^3), batched by
    CHUNK. The direct loop's was 2 n d^2 (a full gemm of all n rows) + 4 d^3 (A S A) + the eigvalsh.
    With fewer drawn rows than features the Gram matrix B B^T has the nonzero eigenvalues (n+^2 d
    work, no rounding noise of d - n+ zero eigenvalues under the sqrt), as `Frechet.of_rows`.
    (X^T X + X^T diag(w - 1) X would touch as many rows: P(w = 1) = P(w = 0).)"""
    CHUNK = 8   # d x d matrices per batched eigvalsh (8 x 2048^2 float64: 268 MB)

    def __init__(self, features, mu2, sigma2, device=None):
        import torch
        self.torch, self.dev = torch, torch.device(device or "cpu")
        self.syrk = self.dev.type == "cpu"   # numpy's symmetric product for the CPU's tensors
        fd = Frechet(mu2, sigma2)
        x = torch.as_tensor(np.asarray(features), device=self.dev).to(torch.float64)
        self.n, self.d = x.shape
        self.m = x.mean(0)
        self.y = x - self.m   # never in place: x may share the caller's float64 array
        del x
        self.a, self.mu2, self.tr2 = (torch.as_tensor(fd.a, device=self.dev), torch.as_tensor(fd.mu2, device=self.dev),
                                      fd.tr2)
        self.z = self.y @ self.a
        self.r = (self.y * self.y).sum(1)

    def _product(self, b, gram: bool):
        """b b^T (gram) or b^T b of a fresh contiguous b: numpy's syrk on the CPU (it takes x.T @ x of
        one buffer as symmetric: half a gemm's flops), else torch's matmul."""
        if self.syrk:
            bn = b.numpy()
            return self.torch.from_numpy(bn @ bn.T if gram else bn.T @ bn)
        return b @ b.mT if gram else b.mT @ b

    def values(self, weights) -> list[float]:
        """The distance of each weight row (integer counts summing to n), in order."""
        torch, n = self.torch, self.n
        const, roots, batch = [], [None] * len(weights), []

        def flush():
            ev = torch.linalg.eigvalsh(torch.stack([mat for _, mat in batch]))
            for (i, _), s in zip(batch, ev.clamp(min=0).sqrt().sum(-1)):
                roots[i] = s
            batch.clear()

        for i, w in enumerate(np.asarray(weights)):
            idx = np.flatnonzero(w)
            wt = torch.as_tensor(w, dtype=torch.float64, device=self.dev)
            e = wt @ self.y / n                      # the resample's mean minus the full sample's
            dm = self.m + e - self.mu2
            const.append(dm @ dm + (wt @ self.r - n * (e @ e)) / (n - 1))
            sel = torch.as_tensor(idx, device=self.dev)
            b = self.z.index_select(0, sel).sub_(e @ self.a).mul_((wt[sel] / (n - 1)).sqrt()[:, None])
            if len(idx) < self.d:                     # rank < d: the Gram matrix's eigenvalues
                roots[i] = torch.linalg.eigvalsh(self._product(b, True)).clamp(min=0).sqrt().sum()
            else:
                batch.append((i, self._product(b, False)))
                if len(batch) == self.CHUNK:
                    flush()
            del b
        if batch:
            flush()
        if not const:
            return []
        v = torch.stack(const) + self.tr2 - 2 * torch.stack(roots)
        return [float(x) for x in v.cpu()]


def bootstrap(features: np.ndarray, mu2, sigma2, value: float, resamples: int = RESAMPLES, seed: int = SEED,
              device=None) -> dict:
    """`resamples` Frechet distances of feature rows drawn with replacement (multinomial weights of
    np.random.default_rng(seed)), computed by `Resampler` in float64 on `device` (the fid stage's),
    and the basic 95% interval around `value` (the full-sample distance)."""
    n = len(features)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    values = Resampler(features, mu2, sigma2, device).values(weights)
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"resamples": resamples, "seed": seed, "level": LEVEL, "method": METHOD,
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
