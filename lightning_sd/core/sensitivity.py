"""SenseMode sensitivities ``S_l`` of the loss to each residual block (Hayou & Ayed 2021, section 5).

The paper defines ``S_l = Loss(W; 1) - Loss(W; 1_l)`` (keep every block vs. remove block l) and uses
its first-order approximation ``S_l ~ dLoss/d delta_l`` at ``delta = 1``. With the multiplier
``m`` of :meth:`~lightning_sd.core.gates.StochasticDepthHandle.override` in place of ``delta``,
``Loss(1_l) ~ Loss(1) - dLoss/dm_l``, so both definitions carry the same sign:

- ``method="gradient"``: ``S_l = dLoss/dm_l`` at ``m = 1``: one forward and one backward per batch,
  the backward taken with :func:`torch.autograd.grad` w.r.t. ``m`` only (no parameter gradient is
  computed or stored).
- ``method="exact"``: ``S_l = Loss(1) - Loss(1_l)``: ``L + 1`` forwards per batch, no backward. Use it
  to check the approximation on small models.

Both average over the batches. Torch only: usable from a plain PyTorch loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sd.core.gates import StochasticDepthHandle, probe_gates
from lightning_sd.core.probing import model_device, restored_state

__all__ = ["SENSITIVITY_METHODS", "estimate_sensitivities", "supervised_loss"]

SENSITIVITY_METHODS = ("gradient", "exact")

LossFn = Callable[[nn.Module, Any], Tensor]


def supervised_loss(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """Turn ``criterion(output, target)`` into a ``loss_fn(model, batch)``.

    The result is what :func:`estimate_sensitivities` takes, for batches ``(inputs, targets)``.

    Example::

        >>> loss_fn = supervised_loss(torch.nn.functional.cross_entropy)
        >>> loss_fn(model, (x, y))  # == F.cross_entropy(model(x), y)
    """

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "supervised_loss expects batches (inputs, targets); got "
                f"{type(batch).__name__}. Write your own loss_fn(model, batch) -> scalar for other batch formats."
            )
        return criterion(model(batch[0]), batch[1])

    return loss_fn


def _scalar_loss(loss: Any) -> Tensor:
    if isinstance(loss, dict):
        loss = loss.get("loss")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar loss tensor (or a dict with key 'loss'), got {shape}. "
            "Reduce the loss over the batch (e.g. .mean()) inside loss_fn."
        )
    return loss.reshape(())


def estimate_sensitivities(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    method: str = "gradient",
    num_batches: int | None = None,
    blocks: str | Sequence[str] | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    restore_buffers: bool = True,
    fork_rng: bool = True,
) -> Tensor:
    r"""Sensitivity ``S_l`` of the loss to each residual block, averaged over ``batches`` (SenseMode, section 5).

    Implements the paper's

    .. math:: S_l = \mathcal{L}(W; \mathbf{1}) - \mathcal{L}(W; \mathbf{1}_l)
              \approx \nabla_{\delta_l} \mathcal{L}(W; \delta)\big|_{\delta = \mathbf{1}}

    with the branch multipliers ``m`` (``y_l = shortcut + m_l f_l(y_{l-1})``) in place of ``delta``.
    ``method="gradient"`` returns the right-hand side (one forward and one backward per batch, the
    backward w.r.t. ``m`` only: parameters get no ``.grad`` and their gradients are not computed);
    ``method="exact"`` the left-hand side (``L + 1`` forwards per batch). ``S_l > 0`` means the loss
    is lower without block l (to first order). SenseMode then keeps block l with probability
    ``p_l ~ |S_l|`` (:func:`~lightning_sd.core.survival.sensemode_rates`).

    The model runs in the mode it is in (``model.train()`` gives the loss the training step sees,
    BatchNorm with batch statistics; ``model.eval()`` the evaluation loss). Measurement has no side
    effects: buffers (BatchNorm running statistics) are restored afterwards (``restore_buffers``),
    the global RNG state is restored (``fork_rng``: dropout noise does not shift the training stream),
    and a plain model gets temporary gates that are removed afterwards. An injected model (see
    :func:`~lightning_sd.core.gates.inject_stochastic_depth`) is measured through its own gates,
    whatever its survival rates: inside the measurement every block is computed with ``m = 1``.

    Args:
        model: a residual model, plain or already injected.
        batches: iterable of batches, each passed unchanged to ``loss_fn`` (move them to the model's
            device beforehand).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor`` (or a dict with key ``"loss"``), e.g.
            ``supervised_loss(F.cross_entropy)``. It must call the model's forward.
        method: ``"gradient"`` (default, the paper's approximation) or ``"exact"`` (leave-one-out).
        num_batches: use at most this many batches (>= 1); ``None`` uses all of ``batches``.
        blocks: which branches of a plain model to measure (see
            :func:`~lightning_sd.core.discovery.find_residual_branches`); must be ``None`` for an
            injected model.
        autocast: a zero-argument callable returning the context manager the forward runs in (e.g.
            ``lambda: torch.autocast("cuda", torch.bfloat16)``, or Lightning's
            ``trainer.precision_plugin.train_step_context``). Multipliers and the returned
            sensitivities stay float32 either way.
        restore_buffers: put every buffer back to its value before the call.
        fork_rng: restore the global torch RNG state (CPU and the model's CUDA device) afterwards.

    Returns:
        float32 CPU tensor of length L (forward order): ``S_1..S_L``.

    Example::

        >>> model = ResidualMLP(16, width=32, depth=8, out_features=1, stable=True)
        >>> batches = [(torch.randn(64, 16), torch.randn(64, 1)) for _ in range(4)]
        >>> S = estimate_sensitivities(model, batches, supervised_loss(F.mse_loss))
        >>> p = survival_rates("sensemode", len(S), 0.3, sensitivities=S)
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(
            f"unknown method={method!r}; choose 'gradient' (dLoss/dm at m = 1, one backward per batch) "
            "or 'exact' (Loss(1) - Loss(1_l), L + 1 forwards per batch)"
        )
    if num_batches is not None and (int(num_batches) != num_batches or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> loss, got {type(loss_fn).__name__}")
    context: Callable[[], AbstractContextManager[Any]] = autocast if autocast is not None else contextlib.nullcontext
    device = model_device(model)
    rng_devices = [device] if device.type == "cuda" else []

    rng = torch.random.fork_rng(devices=rng_devices) if fork_rng else contextlib.nullcontext()
    with rng, restored_state(model, buffers=restore_buffers), probe_gates(model, blocks) as (handle, _):
        num_blocks = handle.num_blocks
        total = torch.zeros(num_blocks, dtype=torch.float64)
        count = 0
        for batch in batches:
            if num_batches is not None and count >= num_batches:
                break
            if method == "gradient":
                total += _gradient(model, handle, batch, loss_fn, context, device)
            else:
                total += _leave_one_out(model, handle, batch, loss_fn, context, device)
            count += 1
    if count == 0:
        raise ValueError("batches yielded no batch; pass at least one batch (e.g. a DataLoader over the training data)")
    return (total / count).to(torch.float32)


def _gradient(
    model: nn.Module,
    handle: StochasticDepthHandle,
    batch: Any,
    loss_fn: LossFn,
    context: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
) -> Tensor:
    m = torch.ones(handle.num_blocks, dtype=torch.float32, device=device, requires_grad=True)
    with torch.enable_grad(), handle.override(m):
        with context():
            loss = _scalar_loss(loss_fn(model, batch))
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not depend on the block multipliers (no graph to differentiate): loss_fn "
                "must call the model's forward, outside torch.no_grad()"
            )
        (grad,) = torch.autograd.grad(loss.float(), m, allow_unused=True)
    if grad is None:
        raise RuntimeError(
            "the loss does not depend on the block multipliers: loss_fn must call the forward of the "
            "model that carries the gates"
        )
    return grad.detach().to(device="cpu", dtype=torch.float64)


def _leave_one_out(
    model: nn.Module,
    handle: StochasticDepthHandle,
    batch: Any,
    loss_fn: LossFn,
    context: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
) -> Tensor:
    num_blocks = handle.num_blocks
    losses = torch.empty(num_blocks + 1, dtype=torch.float64)
    with torch.no_grad():
        for k in range(num_blocks + 1):
            m = torch.ones(num_blocks, dtype=torch.float32, device=device)
            if k > 0:
                m[k - 1] = 0.0
            with handle.override(m), context():
                losses[k] = float(_scalar_loss(loss_fn(model, batch)).float())
    return losses[0] - losses[1:]
