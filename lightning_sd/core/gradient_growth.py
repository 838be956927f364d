"""Gradient-norm growth under stochastic depth at initialization (Hayou & Ayed 2021, Proposition 1, Table 1).

Proposition 1 (ReLU, He init, no branch scaling, infinite width, gradient independence):
``q_l = E_{W, delta} ||d Loss / d y_l||^2 / ||d Loss / d y_L||^2 = prod_{k>l} (1 + p_k)``, and
``2^(L - l)`` without SD. Table 1 reports the average growth rate per layer ``q_l^(1/(L - l))``.

:func:`gradient_growth` measures q_l by Monte Carlo: M masks enter as per-example gates over a
replicated batch (:meth:`~lightning_sd.core.gates.StochasticDepthHandle.override` with ``m`` of shape
``(M, L)``), so one forward and one backward give the M per-mask gradients at every ``y_l``;
optionally over several re-initializations of the weights. Torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sd.core.gates import (
    ResidualGate,
    StochasticDepthHandle,
    probe_gates,
)
from lightning_sd.core.normality import sample_multipliers
from lightning_sd.core.probing import restored_state
from lightning_sd.core.validation import SCALINGS, check_choice, resolve_survival

__all__ = ["GradientGrowth", "gradient_growth", "gradient_growth_rates", "gradient_growth_theory"]


@dataclass(frozen=True)
class GradientGrowth:
    """Measured and predicted gradient growth, entries l = 0..L (``y_0`` is the input of block 1).

    Attributes:
        empirical: float64 ``(L + 1,)``, ``q_l = mean over masks (and inits) of ||g_l||^2 / ||g_L||^2``.
        theory: float64 ``(L + 1,)``, Proposition 1: ``prod_{k>l} (1 + E[m_k^2])``, i.e.
            ``prod (1 + p_k)`` for ``m = delta`` and ``prod (1 + 1/p_k)`` for ``m = delta/p``.
        empirical_rate: float64 ``(L,)``, ``q_l^(1/(L - l))`` for l = 0..L-1 (Table 1).
        theory_rate: float64 ``(L,)``, the same for the theory.
        num_samples: masks x initializations averaged.
        scaling: the mask convention used.
    """

    empirical: Tensor
    theory: Tensor
    empirical_rate: Tensor
    theory_rate: Tensor
    num_samples: int
    scaling: str

    def relative_error(self) -> Tensor:
        """``empirical_rate / theory_rate - 1`` per l (Table 1's comparison)."""
        return self.empirical_rate / self.theory_rate - 1.0


def gradient_growth_rates(q: Tensor) -> Tensor:
    """Average growth rate per layer from l to L, ``q_l^(1/(L - l))`` for l = 0..L-1 (``q`` of length L + 1)."""
    q = torch.as_tensor(q, dtype=torch.float64)
    num_blocks = q.numel() - 1
    span = torch.arange(num_blocks, 0, -1, dtype=torch.float64)
    return q[:-1] ** (1.0 / span)


def _per_mask_growth(
    model: nn.Module,
    handle: StochasticDepthHandle,
    inputs: Tensor,
    masks: Tensor,
    generator: torch.Generator,
    loss_fn: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """``||g_l||^2 / ||g_L||^2`` per row, shape ``(rows, L + 1)``; row r is input r with mask r."""
    num_blocks = handle.num_blocks
    states: list[Tensor | None] = [None] * (num_blocks + 1)
    first_block = model.get_submodule(handle.branches[0].block) if handle.branches[0].block else model

    def pre_hook(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        states[0] = x
        return (x, *args[1:])

    hooks = [first_block.register_forward_pre_hook(pre_hook)]
    for block, gate in enumerate(handle.gates):
        def hook(_mod: nn.Module, _args: object, output: Tensor, block: int = block) -> None:
            states[block + 1] = output

        hooks.append(gate.register_forward_hook(hook))
    try:
        with restored_state(model, "eval"), torch.enable_grad(), handle.override(masks.to(device=inputs.device, dtype=inputs.dtype)):
            out = model(inputs)
            if loss_fn is None:
                z = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
                loss = (out * z).sum()
            else:
                loss = loss_fn(out)
            if any(s is None for s in states):
                raise RuntimeError("some residual blocks did not run in the forward pass")
            grads = torch.autograd.grad(loss, [s for s in states if s is not None])  # none is None (checked above)
    finally:
        for h in hooks:
            h.remove()
    sq = torch.stack([g.detach().double().reshape(g.shape[0], -1).pow(2).sum(1) for g in grads], dim=1)
    return sq / sq[:, -1:]


@contextlib.contextmanager
def _traced_handle(model: nn.Module) -> Iterator[StochasticDepthHandle]:
    with probe_gates(model) as (handle, _):
        if any(not isinstance(g, ResidualGate) for g in handle.gates):
            raise ValueError(
                "gradient_growth needs every residual branch traced (y_l = shortcut + m_l f_l), but some blocks were "
                "found only through a drop-path slot; pass a model whose blocks compute x + f(x) in a traceable forward"
            )
        yield handle


def gradient_growth(
    model: nn.Module | Callable[[], nn.Module],
    inputs: Tensor,
    survival: float | Sequence[float] | Tensor | None,
    *,
    num_masks: int = 500,
    num_inits: int = 1,
    scaling: str = "expected",
    loss_fn: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
) -> GradientGrowth:
    r"""Measure ``q_l = E ||dLoss/dy_l||^2 / ||dLoss/dy_L||^2`` over masks and compare with Proposition 1.

    Each Monte-Carlo sample is one probe input, one mask ``delta ~ Bernoulli(p)`` and one weight
    initialization; the ratio is averaged over samples (the paper's ``E_{W, delta}`` of the ratio).
    Masks are per-example gates over a replicated batch (one forward/backward per chunk). The model
    runs in evaluation mode; its training flags are restored.

    Proposition 1 assumes the Vanilla ResNet ``y_l = y_{l-1} + delta_l W_l relu(y_{l-1})`` (the
    non-stable :class:`~lightning_sd.models.ResidualMLP`), He init, no branch scaling, infinite width and
    gradient independence (backward weights independent of forward weights); then each block multiplies
    the expected squared gradient norm by ``1 + E[m_l^2]``, i.e. ``1 + p_l`` for the paper's masks
    ``m = delta`` (``scaling="expected"``, the default here) and ``1 + 1/p_l`` for ``m = delta/p``.
    At finite width the measured rates deviate by O(1/width) per layer.

    Args:
        model: the network, or a zero-argument factory returning a freshly initialized one; with a
            factory and ``num_inits > 1`` each initialization is built under
            ``torch.manual_seed(seed * 100003 + i)`` inside :func:`torch.random.fork_rng` (the global
            RNG state is left as it was).
        inputs: ``(N, ...)`` probe inputs; sample r uses ``inputs[r % N]``.
        survival: rates p_1..p_L in (0, 1] (float, sequence or tensor), or None / 1.0 for no SD.
        num_masks: masks per initialization, >= 1 (paper: 500).
        num_inits: weight initializations, >= 1 (> 1 needs a factory).
        scaling: ``"expected"`` (m = delta, Prop. 1 as stated) or ``"inverted"`` (m = delta / p).
        loss_fn: ``output -> scalar`` loss summed over the batch (rows must not interact). Default:
            ``sum_r <z_r, y_out_r>`` with fixed Gaussian ``z`` (any loss gives the same q under Prop. 1).
        seed: seed of masks and of ``z`` (independent of the global RNG).
        chunk_size: rows per forward/backward, >= 1.

    Returns:
        :class:`GradientGrowth` with empirical and theoretical ``q_l`` and per-layer rates.

    Example::

        >>> model = ResidualMLP(64, width=256, depth=50, out_features=1)   # Vanilla, He init
        >>> gg = gradient_growth(model, torch.randn(8, 64), 0.7)
        >>> gg.empirical_rate[0], gg.theory_rate[0]          # about 1.7, 1.7 (Table 1, uniform)
    """
    check_choice("scaling", scaling, SCALINGS)
    if int(num_masks) != num_masks or num_masks < 1:
        raise ValueError(f"num_masks must be a positive integer, got {num_masks!r}")
    if int(num_inits) != num_inits or num_inits < 1:
        raise ValueError(f"num_inits must be a positive integer, got {num_inits!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    is_factory = not isinstance(model, nn.Module)
    if not is_factory and num_inits > 1:
        raise ValueError("num_inits > 1 needs a model factory (a zero-argument callable returning a fresh model), not a model instance")
    if not is_factory and not callable(model):
        raise TypeError(f"model must be an nn.Module or a factory, got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a tensor of shape (N, ...) with N >= 1")

    def build(i: int) -> nn.Module:
        if not is_factory:
            return model  # type: ignore[return-value]  # an nn.Module when it is not a factory
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 100003 + i)
            net = model()
        if not isinstance(net, nn.Module):
            raise TypeError(f"the model factory returned a {type(net).__name__}, not an nn.Module")
        return net

    gen = torch.Generator().manual_seed(int(seed) + 7919)
    ratios = []
    p: Tensor | None = None
    for i in range(int(num_inits)):
        net = build(i)
        with _traced_handle(net) as handle:
            if p is None:
                p = resolve_survival(1.0 if survival is None else survival, handle.num_blocks)
                if scaling == "inverted" and bool((p == 0).any()):
                    raise ValueError("a survival rate of 0 with scaling='inverted' divides by zero; use scaling='expected'")
            elif handle.num_blocks != p.numel():
                raise ValueError(f"initialization {i} has {handle.num_blocks} residual branches, the first had {p.numel()}")
            masks = sample_multipliers(p, 1, int(num_masks), scaling=scaling, seed=int(seed) * 1000 + i)[0]
            dtype = next((t.dtype for t in net.parameters() if t.is_floating_point()), torch.float32)
            for start in range(0, int(num_masks), int(chunk_size)):
                stop = min(start + int(chunk_size), int(num_masks))
                idx = (torch.arange(start, stop) + i * int(num_masks)) % inputs.shape[0]
                x = inputs.index_select(0, idx.to(inputs.device)).to(dtype)
                ratios.append(_per_mask_growth(net, handle, x, masks[start:stop].to(dtype), gen, loss_fn))
    assert p is not None
    empirical = torch.cat(ratios).mean(0)
    second_moment = p if scaling == "expected" else torch.where(p > 0, 1.0 / p.clamp_min(1e-300), torch.zeros_like(p))
    theory = gradient_growth_theory(second_moment)  # prod_{k>l} (1 + E[m_k^2])
    return GradientGrowth(
        empirical=empirical,
        theory=theory,
        empirical_rate=gradient_growth_rates(empirical),
        theory_rate=gradient_growth_rates(theory),
        num_samples=int(num_masks) * int(num_inits),
        scaling=scaling,
    )


def gradient_growth_theory(survival: Sequence[float] | Tensor | None, num_blocks: int | None = None) -> Tensor:
    """Proposition 1: ``q_l = prod_{k>l} (1 + p_k)`` for l = 0..L (``2^(L-l)`` without SD).

    Args:
        survival: rates p_1..p_L, or None for no SD (then ``num_blocks`` is required).
        num_blocks: L when ``survival`` is None.

    Returns:
        float64 tensor of length L + 1, entry l is q_l (q_L = 1).
    """
    if survival is None:
        if num_blocks is None:
            raise ValueError("gradient_growth_theory needs survival rates or num_blocks")
        p = torch.ones(num_blocks, dtype=torch.float64)
    else:
        p = torch.as_tensor(survival, dtype=torch.float64).flatten()
    factors = torch.cat([1.0 + p, torch.ones(1, dtype=torch.float64)])
    # q_l = prod_{k=l+1}^{L} (1 + p_k): reverse cumulative product of factors[l:] shifted by one.
    rev = torch.flip(torch.cumprod(torch.flip(factors[:-1], [0]), 0), [0])
    return torch.cat([rev, torch.ones(1, dtype=torch.float64)])
