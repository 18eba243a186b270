"""The protocol's statistics, pure numpy: feature-space rank, paired bootstrap intervals of Frechet distances,
paired tests over training seeds and the seeds a difference needs.

A Frechet distance of n samples is biased upwards and its sampling spread is not Gaussian, so every interval
here is a bootstrap percentile interval (for Frechet distances re-centred on the estimate: `recentre`); rows
that share their noises and prompts (every teacher solver, the student) are resampled with the same indices
(paired), and the reference with its own.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0


def effective_rank(covariance: np.ndarray) -> float:
    """exp(entropy) of the covariance's normalised eigenvalues (Roy & Vetterli 2007): 1 when one direction
    holds all the variance, d when d directions hold equal shares."""
    values = np.clip(np.linalg.eigvalsh(np.asarray(covariance, np.float64)), 0.0, None)
    p = values / values.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    from .metrics import frechet_distance

    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def paired_bootstrap_frechet(rows: dict[str, np.ndarray], reference: np.ndarray,
                             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """Frechet distance of each row's features (n, d) to the reference's (m, d) on `resamples` bootstrap draws;
    every row is drawn with the same indices (they share noises and prompts), the reference independently.
    Returns {row: (resamples,) distances}."""
    sizes = {len(v) for v in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"rows must have equal n to be paired; got {sorted(sizes)}")
    n, m = sizes.pop(), len(reference)
    random = np.random.default_rng(seed)
    out = {name: np.empty(resamples) for name in rows}
    for draw in range(resamples):
        index, ref_index = random.integers(0, n, n), random.integers(0, m, m)
        ref = reference[ref_index]
        for name, features in rows.items():
            out[name][draw] = frechet_from_features(features[index], ref)
    return out


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(draws, np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def recentre(draws: np.ndarray, estimate: float) -> np.ndarray:
    """Bootstrap draws of a Frechet distance shifted so that their median is the estimate. Resampling with
    replacement duplicates samples, which inflates a Frechet distance by about its noise floor (at n = 512 a
    teacher row of 1.7 drew a median of 3.2), so the raw percentile interval can miss the estimate itself."""
    draws = np.asarray(draws, np.float64)
    return draws - (np.median(draws) - estimate)


def paired_bootstrap_mean(values: np.ndarray, resamples: int = 1000, seed: int = BOOTSTRAP_SEED,
                          level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of per-sample values (e.g. a head's correct-or-not), by bootstrap."""
    values = np.asarray(values, np.float64)
    random = np.random.default_rng(seed)
    means = values[random.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return interval(means, level)


def paired_seed_test(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Paired t-test of arm a against arm b over training seeds (same seeds, same order): the mean difference
    a - b, its sample standard deviation, the `level` interval and the two-sided p-value."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError(f"a paired test needs at least 2 seeds per arm, the same in both; got {len(diff)}")
    n, mean, std = len(diff), float(diff.mean()), float(diff.std(ddof=1))
    dof = n - 1
    half = _t_quantile(0.5 + level / 2.0, dof) * std / math.sqrt(n)
    p = 1.0 if std == 0.0 else 2.0 * (1.0 - _t_cdf(abs(mean) / (std / math.sqrt(n)), dof))
    return {"n_seeds": n, "mean_difference": mean, "sd_difference": std, "interval": (mean - half, mean + half),
            "p_value": p, "test": f"paired t, {dof} dof"}


def seeds_needed(difference: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Training seeds a paired t-test needs to find a true mean difference `difference` with per-seed
    standard deviation `sd` at two-sided `alpha` with probability `power` (normal approximation, one pass
    of the t correction)."""
    if difference == 0.0:
        return 10**9
    z = _normal_quantile(1.0 - alpha / 2.0) + _normal_quantile(power)
    n = max(2, math.ceil((z * sd / abs(difference)) ** 2))
    t = _t_quantile(1.0 - alpha / 2.0, n - 1) + _t_quantile(power, n - 1)
    return max(2, math.ceil((t * sd / abs(difference)) ** 2))


def _normal_quantile(probability: float) -> float:
    low, high = -40.0, 40.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if 0.5 * math.erfc(-middle / math.sqrt(2.0)) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def _t_quantile(probability: float, dof: int) -> float:
    """Student-t quantile by bisection on the regularised incomplete beta (numpy only)."""
    low, high = -50.0, 50.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if _t_cdf(middle, dof) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def _t_cdf(t: float, dof: int) -> float:
    x = dof / (dof + t * t)
    tail = 0.5 * _incomplete_beta(dof / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > 1e-30 else 1e-30)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-30 else 1e-30)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-30 else 1e-30
            result *= c * d
    return front * result / a
