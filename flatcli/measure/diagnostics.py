"""Convergence diagnostics of Markov chains: rank-normalized split-R̂, bulk ESS and the MCSE of the mean.

Definitions of Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding, and
localization: an improved R̂ for assessing convergence of MCMC", Bayesian Analysis 16(2), as ArviZ computes
them (``arviz.rhat(method="rank")``, ``arviz.ess(method="bulk")``, ``arviz.mcse(method="mean")``):

    split:   each of the C chains of S draws is cut into its first and last ⌊S/2⌋ draws (2C chains of n)
    z-scale: z = Φ⁻¹((r − 3/8) / (S_total + 1/4)), r the average rank over all draws (Blom's offset)
    R̂(x):   sqrt(((n − 1)/n W + B/n) / W), W the mean within-chain variance, B = n var(chain means)
    R̂:      max(R̂(z-scale(x_s)), R̂(z-scale(|x_s − median x_s|))), x_s the split chains  (bulk, folded tail)
    ESS:     C S / τ, τ = −1 + 2 Σ_t ρ_t with ρ_t from the chains' autocovariances (and B), summed in pairs
             while positive and made monotone (Geyer's initial monotone sequence), on z-scale(split x)
    MCSE:    sd(x) / sqrt(ESS of split x, not rank-normalized)

Thresholds (``summary``): R̂ ≤ 1.01 is Vehtari et al.'s recommendation (1.1, the older rule, misses chains
that have not mixed); ESS ≥ 100 over the chain set makes the MCSE itself accurate to about 10% (its relative
error is ≈ 1/sqrt(2 ESS)) and keeps the R̂ noise of well-mixed chains near 0.005, below the threshold.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

RHAT_MAX = 1.01
ESS_MIN = 100.0


@dataclass(frozen=True)
class Diagnostics:
    rhat: float  # rank-normalized split-R̂, max of bulk and tail; NaN below 2 chains or 4 draws
    ess: float  # bulk effective sample size over all chains
    mcse: float  # Monte Carlo standard error of the mean of all draws
    converged: bool  # rhat ≤ RHAT_MAX and ess ≥ ESS_MIN


def split_chains(x: np.ndarray) -> np.ndarray:
    """(C, S) -> (2C, S // 2): first and last halves (the middle draw of an odd S is dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]])


def z_scale(x: np.ndarray) -> np.ndarray:
    """Normal scores of the ranks over all draws, with Blom's offset (r − 3/8)/(size + 1/4)."""
    r = rankdata(x, method="average", axis=None).reshape(x.shape)
    return ndtri((r - 0.375) / (x.size + 0.25))


def _rhat(x: np.ndarray) -> float:
    n = x.shape[1]
    W = x.var(axis=1, ddof=1).mean()
    B = n * x.mean(axis=1).var(ddof=1)
    if W == 0:  # every chain stuck at one value: not mixed if they differ
        return math.inf if B > 0 else math.nan
    return float(math.sqrt((B / W + n - 1) / n))


def rhat(x: np.ndarray) -> float:
    """Rank-normalized split-R̂ of chains x (C, S): max of bulk and folded-tail R̂."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2 or x.shape[1] < 4 or not np.isfinite(x).all():
        return math.nan
    split = split_chains(x)
    bulk = _rhat(z_scale(split))
    tail = _rhat(z_scale(np.abs(split - np.median(split))))
    return max(bulk, tail)


def _autocov(x: np.ndarray) -> np.ndarray:
    """(C, n) -> (C, n): biased autocovariance of each chain at lags 0..n−1 (by FFT)."""
    n = x.shape[1]
    f = np.fft.rfft(x - x.mean(axis=1, keepdims=True), n=2 * n, axis=1)
    return np.fft.irfft(f * np.conjugate(f), n=2 * n, axis=1)[:, :n] / n


def _ess(x: np.ndarray) -> float:
    """ESS of chains x (C, n) by Geyer's initial monotone sequence, as ArviZ's ``_ess``."""
    C, n = x.shape
    if x.max() - x.min() < np.finfo(float).resolution:
        return float(x.size)
    acov = _autocov(x).mean(axis=0)  # mean over chains, (n,)
    mean_var = acov[0] * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if C > 1 else 0.0)
    rho = np.zeros(n)
    rho[0], even, odd = 1.0, 1.0, 1.0 - (mean_var - acov[1]) / var_plus
    rho[1] = odd
    t = 1
    while t < n - 3 and even + odd > 0:  # initial positive sequence: pairs while their sum is positive
        even, odd = (1.0 - (mean_var - acov[t + k]) / var_plus for k in (1, 2))
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence: pair sums never increase
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
        t += 2
    tau = -1.0 + 2.0 * rho[:max_t + 1].sum() + rho[max_t + 1:max_t + 2].sum()
    tau = max(tau, 1 / math.log10(x.size))
    return math.nan if np.isnan(rho).any() else float(x.size / tau)


def ess(x: np.ndarray) -> float:
    """Bulk effective sample size of chains x (C, S): ESS of the z-scaled split chains."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] < 4 or not np.isfinite(x).all():
        return math.nan
    return _ess(z_scale(split_chains(x)))


def mcse(x: np.ndarray) -> float:
    """Monte Carlo standard error of the mean of all draws of x (C, S): sd / sqrt(ESS of split chains)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] < 4 or not np.isfinite(x).all():
        return math.nan
    return float(x.std(ddof=1) / math.sqrt(_ess(split_chains(x))))


def summary(chains: np.ndarray) -> Diagnostics:
    """R̂, bulk ESS and MCSE of chains (C, S), and whether they pass R̂ ≤ 1.01 and ESS ≥ 100."""
    r, e = rhat(chains), ess(chains)
    return Diagnostics(r, e, mcse(chains), bool(r <= RHAT_MAX and e >= ESS_MIN))
