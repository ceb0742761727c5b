"""Metrics of reward-versus-budget curves, and best-of-N in closed form.

``auc_gain`` is the TTSnap paper's metric: the relative increase of the area under the curve over
best-of-N, both curves shifted by best-of-N's value at the smallest budget, areas by Simpson's rule
(``scipy.integrate.simpson``) over the budget grid. It is invariant to any positive affine rescaling
of the reward (so the authors' display rescaling does not change it) and to the budget unit.
"""
from __future__ import annotations

import numpy as np
from scipy.integrate import simpson
from scipy.special import gammaln


def shifted_area(budgets, curve, shift: float) -> float:
    """Simpson area of ``curve - shift`` over ``budgets``."""
    return float(simpson(np.asarray(curve, float) - shift, x=np.asarray(budgets, float)))


def auc_gain(budgets, curve, baseline) -> float:
    """Percent increase of the area under ``curve`` over that under ``baseline`` (best-of-N).

    Both curves are shifted by ``baseline[0]`` (best-of-N at the smallest budget). Returns NaN when
    the baseline's shifted area is not positive (a flat best-of-N curve has no gain to compare to).
    """
    baseline = np.asarray(baseline, float)
    base_area = shifted_area(budgets, baseline, baseline[0])
    if not base_area > 0:
        return float("nan")
    return 100.0 * (shifted_area(budgets, curve, baseline[0]) - base_area) / base_area


def auc_gain_with_se(budgets, method_iters, baseline_iters) -> tuple[float, float]:
    """AUC gain of the iteration-mean curves and its Monte Carlo standard error (delta method).

    ``method_iters`` and ``baseline_iters`` are ``[iterations, budgets]`` (per-iteration curves,
    already averaged over prompts; the same random subsets for both, so the error accounts for
    their correlation).
    """
    m = np.asarray(method_iters, float)
    b = np.asarray(baseline_iters, float)
    shift = b[:, 0].mean()
    x = np.asarray(budgets, float)
    am = simpson(m - shift, x=x, axis=-1)  # [I] (linear in the curves, so mean(am) = area of the mean curve)
    ab = simpson(b - shift, x=x, axis=-1)
    Am, Ab = am.mean(), ab.mean()
    if not Ab > 0:
        return float("nan"), float("nan")
    gain = 100.0 * (Am - Ab) / Ab
    n = len(am)
    if n < 2:
        return float(gain), float("nan")
    ratio = Am / Ab
    cov = np.cov(np.stack([am, ab]), ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (Ab**2 * n)
    return float(gain), float(100.0 * np.sqrt(max(var, 0.0)))


def best_of_n_weights(total: int, n: int) -> np.ndarray:
    """P(the k-th smallest of ``total`` values is the max of a uniform random ``n``-subset), k=1..total.

    ``C(k-1, n-1) / C(total, n)``, computed in log space.
    """
    if not 1 <= n <= total:
        raise ValueError(f"subset size {n} out of range 1..{total}")
    k = np.arange(1, total + 1)
    w = np.zeros(total)
    ok = k >= n
    kk = k[ok]
    logw = (gammaln(kk) - gammaln(n) - gammaln(kk - n + 1)) - (gammaln(total + 1) - gammaln(n + 1) - gammaln(total - n + 1))
    w[ok] = np.exp(logw)
    return w / w.sum()


def expected_best_of_n(final: np.ndarray, n) -> np.ndarray:
    """Expected best-of-N reward (mean over prompts) for subset sizes ``n``, in closed form.

    ``final`` is ``[prompts, candidates]``; for each prompt with sorted values ``r_(1) <= ... <= r_(M)``
    ``E[max of a random n-subset without replacement] = sum_k r_(k) C(k-1, n-1) / C(M, n)``. Sharing
    the subset across prompts (as the Monte Carlo does) does not change the expectation.
    """
    final = np.sort(np.asarray(final, float), axis=1)
    M = final.shape[1]
    ns = np.atleast_1d(n)
    out = np.array([final.mean(0) @ best_of_n_weights(M, int(k)) for k in ns])
    return out if np.ndim(n) else out[0]


def rescale(values, display: dict | None):
    """Apply a display rescaling ``(v - offset) * scale`` (the authors' figure units)."""
    if not display:
        return np.asarray(values, float)
    return (np.asarray(values, float) - float(display.get("offset", 0.0))) * float(display.get("scale", 1.0))
