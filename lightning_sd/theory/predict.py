"""Log-Gaussian predictions of Li, Nica & Roy (2021) for the ResNet of their Eq. (1).

``z^out =d (||x|| / sqrt(n_in)) (alpha^2 + lam^2)^(d/2) exp(G/2) Z`` (Theorem 1, Eq. (6)) with, in the
limit ``d, n -> infinity``, ``d/n`` fixed, ``G ~ N(mean_G, var_G)``:

* vanilla (Theorem 1, Eq. (7)): ``mean_G = -beta/2 + 2 c h_total``, ``var_G = beta + c^2 I_total``;
  ``h_total = C_{alpha,lam} d/n`` and ``I_total`` from ``J2bar(theta_k)`` (Proposition 2, Eq. (8));
* balanced (Theorem 4, Eq. (9)): ``mean_G = -beta/2``, ``var_G = beta``;

``beta = 2/n + (d/n)(5 lam^4 + 4 alpha^2 lam^2)/(alpha^2 + lam^2)^2`` and ``c = lam^2/(alpha^2 + lam^2)``
(Eq. (5)). The errors are ``O(d/n^2)``. ``C_{alpha,lam}`` has no closed form; as in the paper it is
estimated by Monte-Carlo simulation (:func:`hypoactivation_constant`), once per ``alpha/lam`` per
process, and its Monte-Carlo standard error is carried into the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lightning_sd.theory.simulate import check_simulation_args, simulate

__all__ = [
    "Prediction",
    "beta_c",
    "hypoactivation_constant",
    "interlayer_covariance_total",
    "j2bar",
    "out_sq_moments",
    "predict",
    "predict_infinite_width",
]


@dataclass(frozen=True)
class Prediction:
    """Predicted law of ``G`` and of the output of the network of Eq. (1) at initialization.

    The output moments are for an input with ``||x||^2 = n_in``; for another input multiply
    ``mean_out_sq`` by ``r = ||x||^2 / n_in`` and ``var_out_sq`` by ``r^2`` (the correlation is unchanged).

    Attributes:
        n: width (``None`` for the infinite-width limit).
        d: depth.
        alpha: skip coefficient.
        lam: branch coefficient.
        balanced: Balanced ResNet (Theorem 4) or vanilla (Theorem 1).
        beta: ``beta`` of Eq. (5).
        c: ``c = lam^2 / (alpha^2 + lam^2)`` of Eq. (5).
        h_total: total hypoactivation (Eq. (2)); 0 for balanced.
        I_total: total interlayer covariance correction (Eq. (3)); 0 for balanced.
        mean_G: ``E[G]`` (Eq. (7) or (9)).
        var_G: ``Var[G]``.
        mean_out_sq: ``E[(z_i^out)^2] = (alpha^2+lam^2)^d exp(mean_G + var_G/2)`` (section 3.1).
        var_out_sq: ``Var[(z_i^out)^2] = (alpha^2+lam^2)^(2d) exp(2 mean_G + var_G)(3 exp(var_G) - 1)``.
        corr_out_sq: ``Corr((z_i^out)^2, (z_j^out)^2) = (exp(var_G) - 1)/(3 exp(var_G) - 1)``, ``i != j``
            (section 3.2).
        C: the hypoactivation constant ``C_{alpha,lam}`` used (``h_total = C d/n``); 0 for balanced.
        C_stderr: Monte-Carlo standard error of ``C`` (0 when ``C`` was given or is exact).
        mean_G_stderr: the part of the uncertainty of ``mean_G`` due to ``C_stderr`` (``2 c d/n C_stderr``).
    """

    n: int | None
    d: int
    alpha: float
    lam: float
    balanced: bool
    beta: float
    c: float
    h_total: float
    I_total: float
    mean_G: float
    var_G: float
    mean_out_sq: float
    var_out_sq: float
    corr_out_sq: float
    C: float = 0.0
    C_stderr: float = 0.0
    mean_G_stderr: float = 0.0

    @property
    def std_G(self) -> float:
        """Standard deviation of ``G``."""
        return math.sqrt(self.var_G)

    def pdf_G(self, g: np.ndarray | float) -> np.ndarray:
        """Gaussian density of ``G`` at ``g`` (a point mass at 0 has no density: raises for ``var_G == 0``)."""
        if self.var_G <= 0:
            raise ValueError("the infinite-width limit has G = 0 (a point mass): no density")
        from scipy.stats import norm

        return norm.pdf(np.asarray(g, dtype=np.float64), loc=self.mean_G, scale=self.std_G)

    def ln_out_sq_moments(self, n_out: int, input_log_ratio: float = 0.0) -> tuple[float, float]:
        """Mean and variance of ``ln ||z^out||^2`` for an input with ``ln(||x||^2 / n_in) = input_log_ratio``.

        ``ln ||z^out||^2 = input_log_ratio + d ln(alpha^2 + lam^2) + G + ln chi^2_{n_out}`` with
        ``E ln chi^2_k = digamma(k/2) + ln 2`` and ``Var ln chi^2_k = trigamma(k/2)``.
        """
        from scipy.special import digamma, polygamma

        if n_out < 1:
            raise ValueError(f"n_out must be >= 1, got {n_out}")
        gain = self.d * math.log(self.alpha**2 + self.lam**2)
        mean = input_log_ratio + gain + self.mean_G + float(digamma(n_out / 2)) + math.log(2.0)
        var = self.var_G + float(polygamma(1, n_out / 2))
        return mean, var


def beta_c(n: int, d: int, alpha: float, lam: float) -> tuple[float, float]:
    """``beta`` and ``c`` of Eq. (5)."""
    s = alpha * alpha + lam * lam
    beta = 2.0 / n + (d / n) * (5 * lam**4 + 4 * alpha**2 * lam**2) / s**2
    return beta, lam * lam / s


def j2bar(theta: np.ndarray | float) -> np.ndarray:
    """``J2bar(theta) = 3 sin(theta) cos(theta)/pi + (1 - theta/pi)(1 + 2 cos^2 theta)`` (Proposition 2)."""
    t = np.asarray(theta, dtype=np.float64)
    return 3 * np.sin(t) * np.cos(t) / math.pi + (1 - t / math.pi) * (1 + 2 * np.cos(t) ** 2)


def interlayer_covariance_total(n: int, d: int, alpha: float, lam: float) -> float:
    """``I_total`` of Proposition 2, Eq. (8): ``sum_{l != l'} (J2bar(theta_k) - J2bar(pi - theta_k)) / n``.

    ``k = |l - l'|``, ``cos(theta_k) = alpha^k / (alpha^2 + lam^2)^(k/2)``; the ``d - k`` pairs at each
    distance ``k`` are counted twice (ordered pairs).
    """
    check_simulation_args(n, d, float(alpha), float(lam), 1, "fast")
    if d < 2:
        return 0.0
    k = np.arange(1, d, dtype=np.float64)
    rho = alpha / math.sqrt(alpha * alpha + lam * lam)
    cos_t = np.sign(rho) ** k * np.abs(rho) ** k
    theta = np.arccos(np.clip(cos_t, -1.0, 1.0))
    terms = j2bar(theta) - j2bar(math.pi - theta)
    return float(2.0 * np.sum((d - k) * terms) / n)


# C_{alpha,lam} estimated once, offline, with the simulator of this package (alpha/lam = 1, i.e. the
# paper's alpha = lam = 1/sqrt(2) and the plain He-init ResNet alpha = lam = 1):
#   _hypoactivation_constant_cached(1.0, n=128, num_samples=131072, seed=12345, max_elements=2 * 10**9)
#   -> 131072 networks, 10 burn-in + 32 measured layers, about 2 minutes on one CPU core.
# Keys are alpha/lam; values (C, Monte-Carlo standard error).
_PRECOMPUTED: dict[float, tuple[float, float]] = {1.0: (-0.8949907305431719, 0.01076589243872415)}


@lru_cache(maxsize=64)
def _hypoactivation_constant_cached(
    ratio: float, n: int, num_samples: int, seed: int, max_elements: int
) -> tuple[float, float]:
    alpha, lam = ratio, 1.0
    c = lam * lam / (alpha * alpha + lam * lam)
    # h_l relaxes to its equilibrium geometrically, at rate about (1 - c) per layer.
    burn_in = int(min(400, max(8, math.ceil(math.log(1e-3) / math.log(max(1e-12, 1 - c))))))
    measured = max(32, 2 * burn_in)
    batch = int(max(512, min(num_samples, max_elements // (n * (burn_in + measured)))))
    res = simulate(n, burn_in + measured, alpha, lam, False, num_samples=batch, seed=seed)
    per_sample = res.relu_energy[:, burn_in:].mean(1) - 0.5  # iid over samples
    C = n * float(per_sample.mean())
    se = n * float(per_sample.std()) / math.sqrt(batch)
    return C, se


def hypoactivation_constant(
    alpha: float,
    lam: float,
    n: int = 128,
    num_samples: int = 16384,
    seed: int = 0,
    max_elements: int = 5 * 10**7,
    use_table: bool = True,
) -> tuple[float, float]:
    """Monte-Carlo estimate of ``C_{alpha,lam}`` in ``h_total = C_{alpha,lam} d/n`` (Proposition 2).

    Simulates vanilla networks of width ``n`` with the fast exact simulator, discards the first layers
    (``h_l`` relaxes geometrically to an equilibrium, the paper's Fig. 5) and returns
    ``n * mean(||phi_+(zhat^l)||^2 - 1/2)`` over the remaining layers, with its standard error over the
    independent networks. The law of ``zhat^l`` depends on ``alpha / lam`` only, so results are cached
    per ratio (and settings) for the life of the process. ``alpha = 0`` is exact: ``C = 0``.

    Args:
        alpha: skip coefficient.
        lam: branch coefficient, ``> 0``.
        n: width used for the estimate; the estimate carries an ``O(1/n)`` bias.
        num_samples: maximum number of simulated networks.
        seed: simulator seed (deterministic estimate).
        max_elements: cap on ``networks x layers x n`` (cost control, about 2 s per 5e7 on one core).
        use_table: return the offline estimate stored in this module for ``alpha/lam = 1`` (the paper's
            ``alpha = lam = 1/sqrt(2)``; ``C = -0.895 +- 0.011``) instead of simulating.

    Returns:
        ``(C, stderr)``.

    Example::

        >>> hypoactivation_constant(2 ** -0.5, 2 ** -0.5)  # stored estimate
        (-0.8949907305431719, 0.01076589243872415)
        >>> C, se = hypoactivation_constant(1.0, 0.5)  # simulated once (about 2 s), then cached
    """
    if not (math.isfinite(lam) and lam > 0) or not math.isfinite(alpha):
        raise ValueError(f"need finite alpha and lam > 0, got alpha={alpha!r}, lam={lam!r}")
    if alpha == 0:
        return 0.0, 0.0
    ratio = round(float(alpha) / float(lam), 12)
    if use_table and ratio in _PRECOMPUTED:
        return _PRECOMPUTED[ratio]
    return _hypoactivation_constant_cached(ratio, int(n), int(num_samples), int(seed), int(max_elements))


def _out_moments(d: int, alpha: float, lam: float, mean_G: float, var_G: float) -> tuple[float, float, float]:
    log_gain = d * math.log(alpha * alpha + lam * lam)
    mean = math.exp(log_gain + mean_G + 0.5 * var_G)
    var = math.exp(2 * log_gain + 2 * mean_G + var_G) * (3 * math.exp(var_G) - 1)
    corr = (math.expm1(var_G)) / (3 * math.exp(var_G) - 1)
    return mean, var, corr


def predict(
    n: int,
    d: int,
    alpha: float,
    lam: float,
    balanced: bool = False,
    C: float | None = None,
) -> Prediction:
    """Log-Gaussian prediction for the network of Eq. (1) in the infinite-depth-and-width limit.

    Args:
        n: hidden width, ``>= 1``.
        d: depth (number of residual blocks), ``>= 1``.
        alpha: skip coefficient (the paper's ``alpha``; ``1`` for the plain ``y + f(y)`` ResNet).
        lam: branch coefficient, ``> 0`` (``1`` for He init, ``1/sqrt(d)`` for the Stable ResNet).
        balanced: Balanced ResNet (Theorem 4) instead of vanilla (Theorem 1 + Proposition 2).
        C: hypoactivation constant ``C_{alpha,lam}`` for vanilla; ``None`` estimates it by simulation
            (:func:`hypoactivation_constant`, cached, a few seconds the first time).

    Returns:
        A :class:`Prediction`.

    Example::

        >>> p = predict(100, 100, 2 ** -0.5, 2 ** -0.5, balanced=True)
        >>> round(p.beta, 4), round(p.mean_G, 4), round(p.var_G, 4)
        (2.27, -1.135, 2.27)
    """
    check_simulation_args(n, d, float(alpha), float(lam), 1, "fast")
    alpha, lam = float(alpha), float(lam)
    beta, c = beta_c(n, d, alpha, lam)
    if balanced:
        C_val, C_se, h_total, I_total = 0.0, 0.0, 0.0, 0.0
    else:
        if C is None:
            C_val, C_se = hypoactivation_constant(alpha, lam)
        else:
            C_val, C_se = float(C), 0.0
        h_total = C_val * d / n
        I_total = interlayer_covariance_total(n, d, alpha, lam)
    mean_G = -beta / 2 + 2 * c * h_total
    var_G = beta + c * c * I_total
    mean, var, corr = _out_moments(d, alpha, lam, mean_G, var_G)
    return Prediction(
        n=n, d=d, alpha=alpha, lam=lam, balanced=bool(balanced), beta=beta, c=c, h_total=h_total,
        I_total=I_total, mean_G=mean_G, var_G=var_G, mean_out_sq=mean, var_out_sq=var, corr_out_sq=corr,
        C=C_val, C_stderr=C_se, mean_G_stderr=2 * c * (d / n) * C_se,
    )


def predict_infinite_width(d: int, alpha: float, lam: float) -> Prediction:
    """Gaussian infinite-width prediction (Remark 3): ``G = 0``, output i.i.d. ``N(0, (alpha^2+lam^2)^d)``.

    So ``E[(z_i^out)^2] = (alpha^2+lam^2)^d``, ``Var[(z_i^out)^2] = 2 (alpha^2+lam^2)^(2d)`` and the squared
    outputs are uncorrelated.
    """
    check_simulation_args(1, d, float(alpha), float(lam), 1, "fast")
    alpha, lam = float(alpha), float(lam)
    s = alpha * alpha + lam * lam
    mean, var, corr = _out_moments(d, alpha, lam, 0.0, 0.0)
    return Prediction(
        n=None, d=d, alpha=alpha, lam=lam, balanced=False, beta=0.0, c=lam * lam / s, h_total=0.0,
        I_total=0.0, mean_G=0.0, var_G=0.0, mean_out_sq=mean, var_out_sq=var, corr_out_sq=corr,
    )


def out_sq_moments(G: torch.Tensor | np.ndarray, d: int, alpha: float, lam: float) -> dict[str, float]:
    """Moments of the squared outputs implied by samples of ``G`` (input with ``||x||^2 = n_in``).

    Given ``G``, ``z_i^out = (alpha^2+lam^2)^(d/2) exp(G/2) Z_i`` with ``Z_i`` i.i.d. N(0, 1) (Eq. (6), exact
    by Eq. (15)), so the Gaussian factors are integrated out analytically (Rao-Blackwellisation):
    ``E z_i^2 = E e^G``, ``E z_i^4 = 3 E e^(2G)``, ``Cov(z_i^2, z_j^2) = Var e^G``.

    Returns:
        ``{"mean_G", "var_G", "mean_out_sq", "var_out_sq", "corr_out_sq"}``.
    """
    g = torch.as_tensor(np.asarray(G), dtype=torch.float64)
    log_gain = d * math.log(alpha * alpha + lam * lam)
    eg = torch.exp(g + log_gain)
    m1 = float(eg.mean())
    m2 = float((eg * eg).mean())
    var_out = 3 * m2 - m1 * m1
    cov = m2 - m1 * m1
    return {
        "mean_G": float(g.mean()),
        "var_G": float(g.var()),
        "mean_out_sq": m1,
        "var_out_sq": var_out,
        "corr_out_sq": cov / var_out,
    }
