"""Which drop-path slots of a timm model timm itself ever drops.

timm builds a block at rate 0 with ``nn.Identity`` (or ``None``) in its ``drop_path`` slot. Most such
slots are rate 0 only because of the schedule (``torch.linspace(0, drop_path_rate, depth)`` gives the
first block 0) and are real stochastic-depth branches. Some are rate 0 whatever ``drop_path_rate`` is:
CaiT/XCiT/VOLO class-attention blocks, VOLO's outlooker stage, the convolutional position encodings of
iFormer/SwiftFormer, the CNN backbone inside ViT-hybrid/ViTamin, the last blocks of CSATv2 stages. The
model itself cannot tell the two apart, so :func:`timm_fixed_zero_slots` asks timm: it builds the same
architecture on the meta device (no weights, no download) with the same positive rate given to every
block, and returns the slots that are still not a ``DropPath`` there. Discovery passes those over
(``find_residual_branches``), so the gates sit exactly where timm drops paths, at any ``drop_path_rate``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["timm_fixed_zero_slots"]

_CACHE: dict[tuple[str, tuple[str, ...]], frozenset[str] | None] = {}


class _EveryBlockRate(float):
    """A ``drop_path_rate`` whose products and quotients are itself: every block gets the same rate.

    timm's schedules are ``drop_path_rate * i / (n - 1)`` or a ``linspace`` from 0; with this float (and
    :func:`_constant_linspace`) no block gets rate 0 by schedule, only by the model's design.
    """

    def __mul__(self, other: object) -> _EveryBlockRate:
        return self

    __rmul__ = __truediv__ = __rtruediv__ = __mul__


@contextlib.contextmanager
def _constant_linspace() -> Iterator[None]:
    """``torch.linspace``/``numpy.linspace`` ending at an :class:`_EveryBlockRate` return that rate everywhere."""
    import numpy as np

    torch_linspace, np_linspace = torch.linspace, np.linspace

    def t_linspace(start, end, steps, *args, **kwargs):
        if isinstance(end, _EveryBlockRate):
            return torch.full((int(steps),), float(end), dtype=kwargs.get("dtype"), device=kwargs.get("device"))
        return torch_linspace(start, end, steps, *args, **kwargs)

    def n_linspace(start, stop, num=50, *args, **kwargs):
        if isinstance(stop, _EveryBlockRate):
            return np.full(int(num), float(stop))
        return np_linspace(start, stop, num, *args, **kwargs)

    torch.linspace, np.linspace = t_linspace, n_linspace  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.linspace, np.linspace = torch_linspace, np_linspace


def _slots(model: nn.Module) -> dict[str, bool]:
    """Every drop-path slot of ``model`` (qualified name) -> whether it is a live ``DropPath``."""
    from lightning_sd.core.discovery import SLOT_NAME, is_drop_path_slot

    out: dict[str, bool] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, child in module._modules.items():
            if child is None:
                if SLOT_NAME.fullmatch(attr):
                    out[prefix + attr] = False
            elif is_drop_path_slot(child, attr):
                out[prefix + attr] = type(child) is not nn.Identity
        for attr, value in module.__dict__.items():
            if value is None and attr not in module._modules and SLOT_NAME.fullmatch(attr):
                out[prefix + attr] = False
    return out


def _timm_roots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The outermost submodules built by ``timm.create_model`` (name, module, architecture)."""
    if "timm" not in sys.modules:  # a timm model cannot exist without timm imported
        return []
    import timm

    roots: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if any(name == r or name.startswith(f"{r}.") or r == "" for r, _, _ in roots):
            continue
        cfg = getattr(module, "pretrained_cfg", None)
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if isinstance(arch, str) and timm.is_model(arch):
            roots.append((name, module, arch))
    return roots


def _fixed_zero_of(module: nn.Module, arch: str) -> frozenset[str] | None:
    slots = _slots(module)
    if not slots:
        return frozenset()
    key = (arch, tuple(sorted(slots)))
    if key in _CACHE:
        return _CACHE[key]
    import timm

    try:
        with torch.device("meta"), _constant_linspace():
            reference = timm.create_model(arch, pretrained=False, drop_path_rate=_EveryBlockRate(0.1))
        ref_slots = _slots(reference)
    except Exception:  # an architecture that does not take drop_path_rate, or does not build on meta
        result = None
    else:
        # Only a model with the structure of the reference is answered (user kwargs such as depths
        # can change it); otherwise every slot stays a branch, as without this check.
        result = frozenset(n for n, live in ref_slots.items() if not live) if set(ref_slots) == set(slots) else None
    _CACHE[key] = result
    return result


def timm_fixed_zero_slots(model: nn.Module) -> frozenset[str]:
    """Drop-path slots (qualified names in ``model``) that timm keeps at rate 0 whatever ``drop_path_rate`` is.

    Looks at every submodule built by ``timm.create_model`` (it carries ``pretrained_cfg["architecture"]``),
    builds that architecture on the meta device with rate 0.1 on every block, and returns the slots that
    are still ``nn.Identity``/``None`` there. Models not made by timm, architectures that refuse
    ``drop_path_rate``, and timm models whose slots differ from the default build (other ``depths``, a
    changed model) give no slot. One meta build per architecture and slot layout, cached.

    Args:
        model: any module; timm models inside it (e.g. ``self.net = timm.create_model(...)``) are found.

    Returns:
        frozenset of qualified slot names.

    Example::

        >>> with torch.device("meta"):
        ...     model = timm.create_model("cait_xxs24_224")
        >>> sorted(timm_fixed_zero_slots(model))[:2]
        ['blocks_token_only.0.drop_path', 'blocks_token_only.1.drop_path']
    """
    found: set[str] = set()
    for name, module, arch in _timm_roots(model):
        zero = _fixed_zero_of(module, arch)
        if zero:
            prefix = f"{name}." if name else ""
            found.update(prefix + s for s in zero)
    return frozenset(found)
