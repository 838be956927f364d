"""Balanced ReLUs (Li, Nica & Roy 2021, section 2.1): ``phi_s(z) = relu(s * z)`` with frozen random signs.

A Balanced ResNet applies ``phi_+`` or the domain-flipped ``phi_-(z) = relu(-z)`` to each neuron
according to i.i.d. uniform signs drawn once at initialization and never trained. This removes the
hypoactivation (fewer than half of the ReLUs active) and the interlayer correlations of vanilla ReLU
ResNets, and reduces the variance of ``ln ||z^out||^2`` at initialization exponentially (Theorem 4).

How the sign shape is found (design choice). ``nn.ReLU`` does not know the shape of its input, so
:class:`BalancedReLU` is *lazy*, like ``nn.LazyLinear``: the ``signs`` buffer is empty (``shape (0,)``)
until the first forward, which draws it with the module's own ``torch.Generator`` seeded by its
``seed`` attribute. The result is deterministic given ``seed`` and the input shape, independent of the
global RNG state at forward time. Loading a state_dict into a module whose signs are still empty
materializes them with the saved shape and values, so signs survive ``save -> load`` into a freshly
balanced model even before any forward. To draw all signs eagerly (e.g. before wrapping the model in
DDP or before building an EMA copy), pass ``example_input`` to :func:`balance_relus`, or give
``num_features`` to :class:`BalancedReLU`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_sd.core.probing import restored_state

__all__ = ["BalancedReLU", "balance_relus"]

_GRANULARITIES = ("channel", "neuron")


def _check_granularity(granularity: str) -> None:
    if granularity not in _GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {_GRANULARITIES}")


class BalancedReLU(nn.Module):
    """``relu(s * z)`` with signs ``s`` in ``{-1, +1}`` drawn uniformly once and frozen (a buffer).

    Args:
        num_features: shape of the signs if known: the number of channels for ``"channel"``, the
            per-example activation shape (``x.shape[1:]``) for ``"neuron"``. ``None``: inferred at the
            first forward (lazy).
        granularity: ``"channel"`` (one sign per channel / feature, shared over spatial positions and
            tokens) or ``"neuron"`` (one sign per activation position, the paper's definition for MLPs,
            where both coincide).
        seed: seed of the generator that draws the signs. ``None`` draws a seed from the global torch
            RNG at construction (so ``torch.manual_seed`` controls it); the seed is kept in ``self.seed``.
        channel_dim: dimension of the channels for ``"channel"`` (1 for ``N, C, ...`` tensors, -1 for
            ``N, ..., C`` such as token sequences).

    Signs are a buffer (``signs``, int8) saved in the state_dict, never a parameter: training does not
    change them.

    Example::

        >>> act = BalancedReLU(granularity="channel", seed=0)
        >>> y = act(torch.randn(8, 16, 4, 4))  # draws 16 signs at the first call
        >>> act.signs.shape
        torch.Size([16])
    """

    signs: Tensor

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        granularity: str = "channel",
        seed: int | None = None,
        channel_dim: int = 1,
    ) -> None:
        super().__init__()
        _check_granularity(granularity)
        if channel_dim == 0:
            raise ValueError("channel_dim 0 is the batch dimension")
        self.granularity = granularity
        self.channel_dim = int(channel_dim)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.register_buffer("signs", torch.empty(0, dtype=torch.int8))
        if num_features is not None:
            shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
            if granularity == "channel" and len(shape) != 1:
                raise ValueError(f"'channel' signs are 1-D, got num_features={num_features!r}")
            if any(int(s) < 1 for s in shape):
                raise ValueError(f"num_features must be positive, got {num_features!r}")
            self._materialize(tuple(int(s) for s in shape))

    @property
    def is_materialized(self) -> bool:
        """Whether the signs have been drawn (or loaded)."""
        return self.signs.numel() > 0

    def _materialize(self, shape: tuple[int, ...]) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        s = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1
        self.signs = s.to(torch.int8).to(self.signs.device)

    def _sign_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() < 2:
            raise ValueError(f"BalancedReLU expects a batched input (N, ...), got shape {tuple(x.shape)}")
        if self.granularity == "channel":
            return (x.shape[self.channel_dim],)
        return tuple(x.shape[1:])

    @override
    def forward(self, x: Tensor) -> Tensor:
        shape = self._sign_shape(x)
        if not self.is_materialized:
            self._materialize(shape)
        elif tuple(self.signs.shape) != shape:
            raise RuntimeError(
                f"BalancedReLU signs have shape {tuple(self.signs.shape)} but the input needs {shape} "
                f"(granularity={self.granularity!r}); a ReLU module reused on tensors of different shapes "
                "needs granularity='channel' or one BalancedReLU per use"
            )
        s = self.signs.to(x.dtype)
        if self.granularity == "channel":
            view = [1] * x.dim()
            view[self.channel_dim] = -1
            s = s.view(view)
        return F.relu(x * s)

    @override
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D102
        key = prefix + "signs"
        incoming = state_dict.get(key)
        if incoming is not None and not self.is_materialized and incoming.numel() > 0:
            self.signs = torch.empty(incoming.shape, dtype=torch.int8, device=self.signs.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @override
    def extra_repr(self) -> str:
        shape = tuple(self.signs.shape) if self.is_materialized else "lazy"
        return f"granularity={self.granularity!r}, seed={self.seed}, signs={shape}"


def balance_relus(
    model: nn.Module,
    granularity: str = "channel",
    seed: int | None = None,
    channel_dim: int = 1,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Replace every ``nn.ReLU`` submodule of ``model`` by a :class:`BalancedReLU` (in place).

    Turns a ReLU network into the paper's Balanced network (section 2.1): each ReLU becomes
    ``relu(s * z)`` with frozen uniform random signs. Functional ``F.relu`` calls are not modules and
    are left unchanged. A ReLU module used at several places keeps one set of signs (replaced by one
    shared :class:`BalancedReLU`).

    Args:
        model: the network; modified in place and returned.
        granularity: ``"channel"`` (one sign per channel / feature) or ``"neuron"`` (one sign per
            activation position).
        seed: seeds one generator that draws a seed for each new module, in ``named_modules`` order.
            ``None`` uses the global torch RNG (reproducible under ``torch.manual_seed``).
        channel_dim: channel dimension for ``"channel"`` (1 for ``N, C, H, W``; -1 for ``N, T, C``).
        example_input: optional input; if given, one forward pass (eval mode, no grad; mode restored)
            draws all signs now instead of at the first training forward.

    Returns:
        ``model``.

    Raises:
        ValueError: unknown ``granularity``, ``model`` is itself an ``nn.ReLU``, or contains none
            (checked before anything is modified).

    Example::

        >>> model = CifarResNet(20)
        >>> balance_relus(model, granularity="channel", seed=0, example_input=torch.randn(2, 3, 32, 32))
    """
    _check_granularity(granularity)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.ReLU):
        raise ValueError("model is itself an nn.ReLU: construct a BalancedReLU directly")
    if channel_dim == 0:
        raise ValueError("channel_dim 0 is the batch dimension")
    sites: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent._modules.items():
            if isinstance(child, nn.ReLU):
                sites.append((parent, name, child))
    if not sites:
        already = any(isinstance(m, BalancedReLU) for m in model.modules())
        raise ValueError(
            "model has no nn.ReLU module to balance"
            + (" (it is already balanced)" if already else " (functional relu calls cannot be replaced)")
        )
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    unique = list({id(c): c for _, _, c in sites}.values())
    seeds = torch.randint(0, 2**62, (len(unique),), generator=gen).tolist()
    ref: torch.Tensor | None = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    replacement = {
        id(c): BalancedReLU(granularity=granularity, seed=s, channel_dim=channel_dim).to(device)
        for c, s in zip(unique, seeds)
    }
    for parent, name, child in sites:
        setattr(parent, name, replacement[id(child)])
    if example_input is not None:
        # every submodule's mode is restored (not only the root's) and BatchNorm statistics are kept;
        # the drawn signs are the point of this pass, so BalancedReLU buffers are not rolled back
        with restored_state(model, "eval", buffers=False), torch.no_grad():
            model(example_input)
    return model
