"""Monte-Carlo simulator of the log-Gaussian variable G of Li, Nica & Roy (2021), Theorem 1.

The network is the paper's Eq. (1) (hidden part; the first and last layers only contribute the
``z^0 = g`` and ``z^out = ||z^d|| g' / sqrt(n)`` factors of Eq. (15))::

    z^0 = g,   z^l = alpha z^{l-1} + lam sqrt(2/n) W^l phi(z^{l-1}),   l = 1..d,
    G   = ln(||z^d||^2 / n) - d ln(alpha^2 + lam^2),

with ``W^l`` i.i.d. N(0, 1) entries, ``phi = relu`` (vanilla) or ``phi(z) = relu(s^l * z)`` with i.i.d.
uniform signs ``s^l`` (balanced, section 2.1).

Two exact samplers:

* ``method="dense"`` draws every ``W^l`` (an ``n x n`` matrix per layer and per sample): O(d n^2).
* ``method="fast"`` uses Eq. (14), ``W x =d ||x|| g``: given ``z^{l-1}``, ``W^l phi(z^{l-1})`` is
  ``||phi(z^{l-1})|| g^l`` with a fresh standard Gaussian ``g^l`` (Eq. (16)). ``W^l`` is independent of
  everything before layer ``l``, so the whole chain ``(z^0, ..., z^d)`` has exactly the same joint law
  as in the dense network, at O(d n) per sample.

Both keep the direction ``z^l / ||z^l||`` and accumulate ``ln ||z^l||`` (ReLU is positively
homogeneous, so this rescaling is exact) which avoids overflow for deep networks with
``alpha^2 + lam^2 != 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SimulationResult", "simulate", "simulate_G"]

_METHODS = ("fast", "dense")


@dataclass(frozen=True)
class SimulationResult:
    """Samples of ``G`` and per-layer activation statistics of simulated networks.

    Attributes:
        G: ``(num_samples,)`` float64 samples of ``G`` (one independent network per sample).
        relu_energy: ``(num_samples, d)`` float64, ``||phi(zhat^{l-1})||^2`` at the input of the ReLU of
            block ``l = 1..d`` (``zhat = z / ||z||``). Its mean minus 1/2 is the paper's ``h_l`` (Eq. (2)).
        active_fraction: ``(num_samples, d)`` float64, fraction of the ``n`` ReLUs of block ``l`` that are
            active (``phi(z)_i > 0``).
    """

    G: Tensor
    relu_energy: Tensor
    active_fraction: Tensor

    @property
    def hypoactivation(self) -> Tensor:
        """``(d,)`` Monte-Carlo estimate of ``h_l = E||phi(zhat)||^2 - 1/2`` (Eq. (2)), blocks 1..d."""
        return self.relu_energy.mean(0) - 0.5

    @property
    def h_total(self) -> float:
        """Monte-Carlo estimate of ``h_total = sum_l h_l``."""
        return float(self.hypoactivation.sum())


def check_simulation_args(n: int, d: int, alpha: float, lam: float, num_samples: int, method: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"width n must be an integer >= 1, got {n!r}")
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"depth d must be an integer >= 1, got {d!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be finite and > 0, got {lam!r}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")


def _phi(u: Tensor, balanced: bool, gen: torch.Generator | None) -> Tensor:
    """Pre-activation after the sign flip: ``u`` (vanilla) or ``s * u`` with fresh uniform signs."""
    if not balanced:
        return u
    batch, n = u.shape
    # one random byte gives 8 independent fair signs
    raw = torch.randint(0, 256, (batch, (n + 7) // 8), generator=gen, device=u.device, dtype=torch.uint8)
    shifts = torch.arange(8, device=u.device, dtype=torch.uint8)
    bits = ((raw.unsqueeze(-1) >> shifts) & 1).view(batch, -1)[:, :n].bool()
    return torch.where(bits, u, -u)


def _run_chunk(
    n: int, d: int, alpha: float, lam: float, balanced: bool, batch: int, gen: torch.Generator | None,
    method: str, device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    f64 = torch.float64
    z = torch.randn(batch, n, generator=gen, dtype=f64, device=device)
    sq = z.square().sum(1)
    log_sq = torch.log(sq / n)  # ln(||z^0||^2 / n)
    u = z / sq.sqrt().unsqueeze(1)  # zhat^0
    energy = torch.empty(batch, d, dtype=f64, device=device)
    active = torch.empty(batch, d, dtype=f64, device=device)
    scale = lam * math.sqrt(2.0 / n)
    for layer in range(d):
        pre = _phi(u, balanced, gen)
        act = pre.clamp_min(0)
        e = act.square().sum(1)
        energy[:, layer] = e
        active[:, layer] = (pre > 0).sum(1).to(f64) / n
        if method == "fast":
            g = torch.randn(batch, n, generator=gen, dtype=f64, device=device)
            v = alpha * u + (scale * e.sqrt()).unsqueeze(1) * g  # Eq. (16)
        else:
            w = torch.randn(batch, n, n, generator=gen, dtype=f64, device=device)
            v = alpha * u + scale * torch.bmm(w, act.unsqueeze(2)).squeeze(2)
        r = v.square().sum(1)  # ||z^l||^2 / ||z^{l-1}||^2
        log_sq = log_sq + torch.log(r)
        u = v / r.sqrt().unsqueeze(1)
    G = log_sq - d * math.log(alpha * alpha + lam * lam)
    return G, energy, active


def simulate(
    n: int,
    d: int,
    alpha: float,
    lam: float,
    balanced: bool = False,
    num_samples: int = 10000,
    seed: int | None = None,
    method: str = "fast",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> SimulationResult:
    """Simulate ``num_samples`` independent networks of Eq. (1) at initialization.

    Args:
        n: hidden width, ``>= 1``.
        d: number of residual blocks (hidden layers), ``>= 1``.
        alpha: skip-connection coefficient (any finite real).
        lam: branch coefficient, ``> 0``; the branch weight variance is ``2 lam^2 / n`` (He init times ``lam^2``).
        balanced: Balanced ResNet (fresh uniform signs ``s^l`` in every network, section 2.1).
        num_samples: number of independent networks.
        seed: seed of a dedicated ``torch.Generator``; ``None`` draws from the global torch RNG.
        method: ``"fast"`` (Eq. (14)-(16), O(d n) per sample, exact in distribution) or ``"dense"``
            (draws the weight matrices, O(d n^2) per sample; the reference).
        chunk_size: samples simulated at once (memory control); default 65536 for ``"fast"`` and
            ``max(1, 2**22 // n**2)`` for ``"dense"``.
        device: torch device of the computation; results are returned on CPU.

    Returns:
        A :class:`SimulationResult` (float64).

    Example::

        >>> res = simulate(100, 100, 2 ** -0.5, 2 ** -0.5, num_samples=1000, seed=0)
        >>> res.G.shape, res.active_fraction.shape
        (torch.Size([1000]), torch.Size([1000, 100]))
    """
    check_simulation_args(n, d, float(alpha), float(lam), num_samples, method)
    alpha, lam = float(alpha), float(lam)
    device = torch.device(device)
    if chunk_size is None:
        chunk_size = 65536 if method == "fast" else max(1, 2**22 // (n * n))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    Gs, energies, actives = [], [], []
    done = 0
    while done < num_samples:
        batch = min(chunk_size, num_samples - done)
        G, e, a = _run_chunk(n, d, alpha, lam, balanced, batch, gen, method, device)
        Gs.append(G.cpu())
        energies.append(e.cpu())
        actives.append(a.cpu())
        done += batch
    return SimulationResult(torch.cat(Gs), torch.cat(energies), torch.cat(actives))


def simulate_G(
    n: int,
    d: int,
    alpha: float,
    lam: float,
    balanced: bool = False,
    num_samples: int = 10000,
    seed: int | None = None,
    method: str = "fast",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Samples of ``G = ln(||z^d||^2 / n) - d ln(alpha^2 + lam^2)`` (Theorem 1, Eq. (6)) at ``z^0 = g``.

    ``z^out =d (||x|| / sqrt(n_in)) (alpha^2 + lam^2)^(d/2) exp(G/2) Z`` with ``Z`` standard Gaussian in
    ``R^{n_out}`` independent of ``G`` (Eq. (15)), so these samples give the exact law of the output of
    the paper's network at initialization for any input.

    Args:
        n: hidden width, ``>= 1``.
        d: depth (number of residual blocks), ``>= 1``.
        alpha: skip coefficient.
        lam: branch coefficient, ``> 0``.
        balanced: simulate Balanced ResNets (random frozen signs before each ReLU).
        num_samples: number of independent networks (samples of ``G``).
        seed: seed of a dedicated generator (reproducible); ``None`` uses the global torch RNG.
        method: ``"fast"`` (``W x =d ||x|| g``, Eq. (14)-(16), O(d n) per sample) or ``"dense"``
            (explicit Gaussian weight matrices, O(d n^2) per sample). Both are exact in distribution.
        chunk_size: samples per batch (memory control).
        device: device of the computation; the result is a CPU tensor.

    Returns:
        ``(num_samples,)`` float64 tensor.

    Example::

        >>> G = simulate_G(100, 100, 2 ** -0.5, 2 ** -0.5, balanced=True, num_samples=10000, seed=0)
        >>> round(G.mean().item(), 1), round(G.var().item(), 1)  # Theorem 4: -beta/2, beta = 2.27
        (-1.1, 2.3)
    """
    return simulate(n, d, alpha, lam, balanced, num_samples, seed, method, chunk_size, device).G
