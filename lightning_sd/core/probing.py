"""Leave no trace: the one context manager every probe of the model runs in.

Measurements (SenseMode sensitivities, regularization terms, normality p-values, gradient growth,
log-Gaussian probes) run the model outside the training step. Observing never perturbs: a run with
them must end exactly as the run without them, so each probe puts back what a forward pass
can change: the train/eval flag of every submodule (not only the root's) and every buffer (BatchNorm
running mean, variance and ``num_batches_tracked``, lazily drawn buffers such as BalancedReLU signs).
The global random state is the caller's business: core functions use :func:`torch.random.fork_rng`,
Lightning callbacks :func:`lightning.pytorch.utilities.seed.isolate_rng`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

__all__ = ["model_device", "model_float_dtype", "restored_state"]


@contextlib.contextmanager
def restored_state(module: nn.Module, mode: Literal["train", "eval"] | None = None, *, buffers: bool = True) -> Iterator[nn.Module]:
    """Run a probe on ``module`` and put its modes and buffers back afterwards, whatever the probe did.

    Args:
        module: the model (every submodule is saved, not only the root).
        mode: ``"train"`` or ``"eval"`` sets the whole model to that mode inside the block; ``None``
            leaves the modes as they are (they are still restored on exit).
        buffers: save every buffer's value and put it back on exit (in place, so references held
            elsewhere stay valid; a buffer the probe replaced by a new tensor gets its original back).

    Yields:
        ``module``.

    Example::

        >>> with restored_state(model, "train"):
        ...     loss = model(x).square().mean()   # BatchNorm updates its running statistics here
        >>> # running statistics and every module's training flag are as before
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None (leave as is), got {mode!r}")
    flags = [(m, m.training) for m in module.modules()]
    saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    if buffers:
        for owner in module.modules():
            for name, buf in owner._buffers.items():
                if buf is not None:
                    saved.append((owner, name, buf, buf.detach().clone()))
    if mode is not None:
        module.train(mode == "train")
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for owner, name, buf, copy in saved:
                if buf.shape == copy.shape and buf.dtype == copy.dtype:
                    buf.copy_(copy)
                    owner._buffers[name] = buf
                else:  # the probe replaced it by a tensor of another shape: put the original object back
                    owner._buffers[name] = copy


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (else buffer); torch's default without any."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); the CPU without any."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")
