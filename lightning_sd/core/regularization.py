r"""Regularization terms ``g_l`` and the explicit penalty ``R`` of stochastic depth (Hayou & Ayed 2021, 4.1).

A second-order expansion of the loss around the average network marginalizes the masks out:
training with SD is training the average network plus the explicit penalty (Eq. (4)/(6))

.. math::

    R = \frac{1}{2} \sum_{l=1}^{L} \mathrm{Var}(m_l)\, g_l, \qquad
    g_l = \mathbb{E}_x\big[\zeta_l(x)^T H(x)\, \zeta_l(x)\big] \quad (5),

with ``zeta_l = d y_out / d m_l`` at ``m = 1`` (the "information discrepancy" of block l, a vector of
the output's size) and ``H`` the Hessian of the per-example loss with respect to the output:
``diag(pi) - pi pi^T`` (cross-entropy, ``pi = softmax(y_out)``) or ``2 I`` (squared error
``||y - t||^2``). Neither needs the targets. ``Var(m_l) = p_l (1 - p_l)`` with ``scaling="expected"``
(``m = delta``) and ``(1 - p_l) / p_l`` with ``scaling="inverted"`` (``m = delta / p``).

Two networks (``mode``):

- ``"eval"`` (the default of :func:`regularization_terms` and of the monitor): BatchNorm uses its
  running statistics, so example b's output depends on its own gates only. The estimators use
  per-example gates ``m`` of shape ``(B, L)`` through
  :meth:`~lightning_sd.core.gates.StochasticDepthHandle.override`: one vector-Jacobian product of
  ``(v * y_out).sum()`` with respect to ``m`` gives ``v_b^T zeta_l(x_b)`` for every example and block.
- ``"train"`` (what ``StochasticDepth(mode="maxreg")`` measures, the network SenseMode differentiates
  too): the training-mode network, BatchNorm with batch statistics, one gate per block shared by the
  batch as ``drop="batch"`` applies it, dropout active (one draw). Without a BatchNorm layer the
  examples are independent and the per-example estimators above give exactly these terms. With one,
  the examples are coupled through the batch statistics and the per-example trick does not hold:
  ``zeta_l`` of every example then comes from one forward-mode (Jacobian-vector) pass per block, exact
  whatever ``estimator``, with the same dropout draws in every pass (cost: L forwards per batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from lightning_sd.core.gates import StochasticDepthHandle, mask_generator, probe_gates
from lightning_sd.core.probing import model_float_dtype, restored_state
from lightning_sd.core.validation import SCALINGS, check_choice, check_unit_interval

__all__ = [
    "REGULARIZATION_ESTIMATORS",
    "REGULARIZATION_LOSSES",
    "explicit_penalty",
    "gate_variance",
    "penalty_terms",
    "regularization_terms",
]

REGULARIZATION_LOSSES = ("cross_entropy", "mse")
REGULARIZATION_ESTIMATORS = ("exact", "sampled", "auto")


def _flat_output(out: object, batch: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a tensor; regularization_terms needs the output "
            "y_out of shape (B, o). Wrap the model so that forward returns the logits/predictions tensor."
        )
    if out.ndim == 0 or out.shape[0] != batch:
        raise ValueError(f"the model output has shape {tuple(out.shape)}; expected (B, ...) with B = {batch} (the probe batch)")
    return out.reshape(batch, -1)


def check_simulation_args(loss: str, estimator: str, num_samples: int) -> None:
    if loss not in REGULARIZATION_LOSSES:
        raise ValueError(
            f"unknown loss={loss!r}; choose 'cross_entropy' (H = diag(pi) - pi pi^T, classification logits) "
            "or 'mse' (H = 2I, the squared error ||y - t||^2)"
        )
    if estimator not in REGULARIZATION_ESTIMATORS:
        raise ValueError(
            f"unknown estimator={estimator!r}; choose 'exact' (one backward per output coordinate), "
            "'sampled' (num_samples backwards, unbiased) or 'auto' (exact when o <= num_samples)"
        )
    if estimator != "exact" and (int(num_samples) != num_samples or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer for estimator='sampled', got {num_samples!r}")


def regularization_terms(
    model: nn.Module,
    inputs: Tensor,
    *,
    loss: str = "cross_entropy",
    estimator: str = "exact",
    num_samples: int = 16,
    blocks: str | Sequence[str] | None = None,
    seed: int = 0,
    reduction: str = "mean",
    mode: Literal["eval", "train"] = "eval",
) -> Tensor:
    """Regularization terms ``g_l = mean_x zeta_l(x)^T H(x) zeta_l(x)`` of every residual block (Eq. (5)).

    Works on a plain model (gates are injected with ``survival=1.0`` for the probe and removed
    afterwards) or on a model that already carries stochastic-depth gates (its handle is used; the
    rates play no role: ``zeta`` is taken at ``m = 1``). During the probe the whole model is in
    evaluation mode (``mode="eval"``: BatchNorm uses its running statistics, dropout is off) or in
    training mode (``mode="train"``: batch statistics, gates shared by the batch, see the module
    docstring); the train/eval flag of every module and every buffer are restored afterwards
    (:func:`~lightning_sd.core.probing.restored_state`) and the global RNG is not consumed. Only
    ``d/dm`` is computed, so parameter ``.grad`` are left untouched.

    Estimators:

    - ``"exact"``: ``zeta`` of shape ``(B, L, o)`` from ``o`` backward passes (one per output
      coordinate c: ``d y_out[:, c] / d m`` for all examples and blocks), then the quadratic form with
      the explicit ``H``. Cost: 1 forward + ``o`` backwards; fine up to ~100 outputs.
    - ``"sampled"``: Hutchinson's estimator with a square root of ``H``: ``v = H^{1/2} r``, r Rademacher,
      so ``E[v v^T] = H`` and ``E[(v^T zeta_l)^2] = zeta_l^T H zeta_l``. For ``"mse"``,
      ``v = sqrt(2) r``; for ``"cross_entropy"``, ``v = sqrt(pi) * r - pi (sqrt(pi)^T r)``
      (``H = diag(sqrt(pi)) P diag(sqrt(pi))`` with ``P = I - sqrt(pi) sqrt(pi)^T`` a projection).
      One backward of ``(v * y_out).sum()`` per sample gives every example and block, so the cost is
      1 forward + ``num_samples`` backwards whatever L and o. Unbiased; the relative variance of
      each example's estimate is at most ``2 / num_samples`` (Rademacher fourth moment).
    - ``"auto"``: ``"exact"`` when the output has at most ``num_samples`` coordinates (no more
      backwards, no variance), else ``"sampled"``.

    Args:
        model: a residual model mapping ``inputs`` to ``y_out`` of shape ``(B, o)`` (extra dimensions
            are flattened into o).
        inputs: one probe batch, shape ``(B, ...)``; floating inputs are cast to the model's dtype.
        loss: ``"cross_entropy"`` (logits; ``H = diag(pi) - pi pi^T``) or ``"mse"`` (``H = 2I``,
            the paper's ``||y - t||^2``).
        estimator: ``"exact"``, ``"sampled"`` or ``"auto"``.
        num_samples: probe vectors for ``"sampled"`` (>= 1); 16 gives ~5% relative error on a batch
            of 128.
        blocks: which branches, as in :func:`~lightning_sd.find_residual_branches`; only for a plain
            model (an injected model uses its handle's blocks).
        seed: seed of the probe vectors (``"sampled"``); they come from a dedicated generator, the global
            RNG is not touched.
        reduction: ``"mean"`` (g over the batch, length L) or ``"none"`` (per example, ``(B, L)``).
        mode: ``"eval"`` (the evaluation network) or ``"train"`` (the training network: BatchNorm batch
            statistics and one gate per block for the batch; with BatchNorm exact whatever ``estimator``,
            at the cost of L forward-mode passes). See the module docstring.

    Returns:
        float64 CPU tensor: ``g`` of length L (forward order), or ``(B, L)`` with ``reduction="none"``.

    Example::

        >>> model = CifarResNet(20, width=8)
        >>> g = regularization_terms(model, torch.randn(64, 3, 8, 8), loss="cross_entropy")
        >>> g.shape
        torch.Size([9])
    """
    check_simulation_args(loss, estimator, num_samples)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' (g over the batch) or 'none' (per example), got {reduction!r}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a tensor of shape (B, ...) with B >= 1 (one probe batch)")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' (running statistics) or 'train' (the training network), got {mode!r}")
    rng_devices = [inputs.device] if inputs.device.type == "cuda" else []
    with probe_gates(model, blocks) as (handle, _), restored_state(model, mode), torch.random.fork_rng(devices=rng_devices):
        if mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            g = _terms_shared_gates(model, handle, inputs, loss)
        else:
            g = _terms(model, handle, inputs, loss, estimator, int(num_samples), int(seed))
    return g.mean(dim=0) if reduction == "mean" else g


def _terms(
    model: nn.Module, handle: StochasticDepthHandle, inputs: Tensor, loss: str, estimator: str, num_samples: int, seed: int
) -> Tensor:
    dtype = model_float_dtype(model)
    if inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    batch, num_blocks = inputs.shape[0], handle.num_blocks
    m = torch.ones(batch, num_blocks, dtype=_gate_dtype(dtype), device=inputs.device, requires_grad=True)
    # Detached parameters (swapped in for this call only): the backwards then run w.r.t. m alone and skip
    # every weight gradient (about a third of the cost on a CNN), without touching requires_grad flags.
    detached = {name: p.detach() for name, p in model.named_parameters()}
    with torch.enable_grad(), handle.override(m):
        out = torch.func.functional_call(model, detached, (inputs,), strict=False, tie_weights=True)
        y = _flat_output(out, batch)
        math_dtype = torch.promote_types(y.dtype, torch.float32)
        if estimator == "exact" or (estimator == "auto" and y.shape[1] <= num_samples):
            return _exact(y, m, loss)
        return _sampled(y, m, loss, math_dtype, num_samples, seed)


def _gate_dtype(dtype: torch.dtype) -> torch.dtype:
    # Gates in the model's precision when it is lower than fp32 (an fp32 multiplier would promote the
    # residual stream and break the next bf16/fp16 layer), else fp32 or fp64; statistics are fp64.
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def _quadratic_form(y: Tensor, zeta: Tensor, loss: str) -> Tensor:
    """``zeta_b^T H_b zeta_b`` per example for outputs ``y`` (B, o) and discrepancies ``zeta`` (B, ..., o), fp64."""
    zeta = zeta.to(torch.float64)
    if loss == "mse":
        return 2.0 * zeta.square().sum(dim=-1)
    pi = torch.softmax(y.detach().to(torch.promote_types(y.dtype, torch.float32)), dim=1).to(torch.float64)
    pi = pi.reshape(pi.shape[0], *([1] * (zeta.ndim - 2)), pi.shape[1])
    g = (pi * zeta.square()).sum(dim=-1) - (pi * zeta).sum(dim=-1).square()
    return g.clamp_min(0.0)  # PSD form; removes -1e-17 round-off


def _terms_shared_gates(model: nn.Module, handle: StochasticDepthHandle, inputs: Tensor, loss: str) -> Tensor:
    """``(B, L)`` terms on the training network: one Jacobian-vector product per block, gates shared by the batch."""
    dtype = model_float_dtype(model)
    if inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    batch, num_blocks = inputs.shape[0], handle.num_blocks
    ones = torch.ones(num_blocks, dtype=_gate_dtype(dtype), device=inputs.device)
    rng_devices = [inputs.device] if inputs.device.type == "cuda" else []
    g = torch.zeros(batch, num_blocks, dtype=torch.float64)
    with torch.no_grad():
        for block in range(num_blocks):
            tangent = torch.zeros_like(ones)
            tangent[block] = 1.0
            # every pass starts from the same random state: the same dropout draws, one network
            with torch.random.fork_rng(devices=rng_devices), fwAD.dual_level():
                with handle.override(fwAD.make_dual(ones, tangent)):
                    out = model(inputs)
                if not isinstance(out, Tensor):
                    _flat_output(out, batch)  # raises the usual message
                y, zeta = fwAD.unpack_dual(out)
            y = _flat_output(y, batch)
            if zeta is not None:  # None: the output does not depend on this block
                g[:, block] = _quadratic_form(y, zeta.reshape(batch, -1), loss).cpu()
    return g


def _exact(y: Tensor, m: Tensor, loss: str) -> Tensor:
    outputs = y.shape[1]
    zeta = torch.empty(y.shape[0], m.shape[1], outputs, dtype=torch.float64, device=y.device)
    for c in range(outputs):
        (grad,) = torch.autograd.grad(y[:, c].sum(), m, retain_graph=c < outputs - 1, allow_unused=True)
        zeta[:, :, c] = 0.0 if grad is None else grad.to(torch.float64)
    return _quadratic_form(y, zeta, loss).cpu()


def _sampled(y: Tensor, m: Tensor, loss: str, math_dtype: torch.dtype, num_samples: int, seed: int) -> Tensor:
    batch, outputs = y.shape
    gen = mask_generator(seed, batch, outputs, 0x5D)
    acc = torch.zeros(batch, m.shape[1], dtype=torch.float64, device=y.device)
    if loss == "cross_entropy":
        pi = torch.softmax(y.detach().to(math_dtype), dim=1)
        root = pi.sqrt()
    for s in range(num_samples):
        r = (torch.randint(0, 2, (batch, outputs), generator=gen, dtype=torch.int8) * 2 - 1).to(device=y.device, dtype=math_dtype)
        if loss == "mse":
            v = r * math.sqrt(2.0)
        else:
            v = root * r - pi * (root * r).sum(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad((v.to(y.dtype) * y).sum(), m, retain_graph=s < num_samples - 1, allow_unused=True)
        if grad is not None:
            acc += grad.to(torch.float64).square()
    return (acc / num_samples).cpu()


def gate_variance(survival: Sequence[float] | Tensor, scaling: str) -> Tensor:
    """``Var(m_l)`` of the training multiplier: ``p (1 - p)`` (``"expected"``) or ``(1 - p) / p`` (``"inverted"``).

    Args:
        survival: rates p_l in [0, 1] (no zero with ``"inverted"``: the variance is infinite).
        scaling: ``"expected"`` (``m = delta``) or ``"inverted"`` (``m = delta / p``).

    Returns:
        float64 tensor of the rates' shape.
    """
    check_choice("scaling", scaling, SCALINGS)
    p = torch.as_tensor(survival, dtype=torch.float64).detach().cpu()
    check_unit_interval(p)
    if scaling == "expected":
        return p * (1.0 - p)
    if bool((p == 0).any()):
        zero = torch.nonzero(p.flatten() == 0).flatten().tolist()
        raise ValueError(
            f"survival rate 0 for blocks {zero} with scaling='inverted': Var(delta/p) = (1-p)/p is infinite. "
            "Use scaling='expected' or rates > 0."
        )
    return (1.0 - p) / p


def penalty_terms(g: Sequence[float] | Tensor, survival: Sequence[float] | Tensor, scaling: str) -> Tensor:
    """Per-block contributions ``R_l = Var(m_l) g_l / 2`` to the explicit penalty (their sum is ``R``).

    Args:
        g: regularization terms g_l (length L, from :func:`regularization_terms`).
        survival: rates p_l (length L).
        scaling: ``"expected"`` or ``"inverted"``.

    Returns:
        float64 CPU tensor of length L.
    """
    g_t = torch.as_tensor(g, dtype=torch.float64).detach().cpu().flatten()
    var = gate_variance(survival, scaling).flatten()
    if g_t.numel() != var.numel():
        raise ValueError(f"g has {g_t.numel()} entries but survival has {var.numel()}; both must have one per block (L)")
    if not bool(torch.isfinite(g_t).all()):
        raise ValueError("g must be finite; recompute it on a batch where the loss is finite")
    return 0.5 * var * g_t


def explicit_penalty(g: Sequence[float] | Tensor, survival: Sequence[float] | Tensor, scaling: str) -> float:
    """The explicit penalty of SD: ``R = 1/2 sum_l Var(m_l) g_l`` (Hayou & Ayed 2021, Eq. (4)/(6)).

    With ``scaling="expected"`` and the paper's ``1/sqrt(L)`` folded into the branches this is
    ``(1/2L) sum_l p_l (1 - p_l) g_l``: the second-order gap ``E_delta[loss] - loss(average network)``.

    Args:
        g: regularization terms g_l >= 0 (length L, from :func:`regularization_terms`).
        survival: rates p_l in [0, 1] (length L).
        scaling: ``"expected"`` (``Var = p(1-p)``) or ``"inverted"`` (``Var = (1-p)/p``).

    Returns:
        R as a Python float (same units as the loss).

    Example::

        >>> g = regularization_terms(model, x, loss="mse")
        >>> explicit_penalty(g, survival_rates("uniform", len(g), 0.8), "expected")
    """
    return float(penalty_terms(g, survival, scaling).sum())
