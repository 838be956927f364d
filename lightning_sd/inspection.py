r"""``lightning-sd inspect``: what stochastic depth would gate in a timm or torchvision model.

The model is built on the meta device (no weights are downloaded or allocated), then
:func:`~lightning_sd.describe_branches` prints one row per residual branch (block, class, shortcut
kind, ``skip`` or ``slot``, branch modules) and what was passed over and why::

    lightning-sd inspect timm:resnet50
    lightning-sd inspect timm:vit_small_patch16_224 --drop-path-rate 0.1
    lightning-sd inspect torchvision:regnet_y_400mf
    lightning-sd inspect timm:convit_tiny --blocks 'blocks\.[0-5]\..*' --strict

Exit status: 0, or 1 with ``--strict`` when discovery leaves something residual-looking uncovered, or 2
for a model name that does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_sd.core.discovery import describe_branches

__all__ = ["build_meta_model", "inspect_main"]

_SOURCES = ("timm", "torchvision")


def build_meta_model(spec: str, drop_path_rate: float | None = None) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME`` without weights, on the meta device where it can be.

    Args:
        spec: ``"timm:<model name>"`` or ``"torchvision:<model name>"`` (names from ``timm.list_models()``
            or ``torchvision.models.list_models()``).
        drop_path_rate: passed to timm's ``create_model`` when given (the discovery result does not
            depend on it).

    Raises:
        ValueError: an unknown source or model name (the message lists how to find names).
    """
    source, sep, name = spec.partition(":")
    if not sep or source not in _SOURCES or not name:
        raise ValueError(f"model {spec!r}: write timm:NAME or torchvision:NAME (e.g. timm:resnet50, torchvision:vit_b_16)")
    if source == "timm":
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name[:6]}*")[:8]
            raise ValueError(f"timm has no model {name!r}; names like it: {close or 'none'} (timm.list_models())")
        kwargs: dict[str, Any] = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    except NotImplementedError:  # inits that copy from numpy (GoogLeNet, Inception) cannot run on meta
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, init_weights=False)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sd inspect`` with ``argv`` (the arguments after ``inspect``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="lightning-sd inspect",
        description="Print the residual branches stochastic depth would gate in a timm or torchvision model "
        "(built on the meta device, no weights).",
    )
    parser.add_argument("model", help="timm:NAME or torchvision:NAME")
    parser.add_argument("--blocks", default=None, help="regular expression over block or branch names (as blocks=)")
    parser.add_argument("--drop-path-rate", type=float, default=None, help="build the timm model with this drop_path_rate")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when something residual-looking is uncovered")
    args = parser.parse_args(argv)
    try:
        model = build_meta_model(args.model, args.drop_path_rate)
    except ValueError as err:
        print(f"lightning-sd inspect: {err}", file=sys.stderr)
        return 2
    report = describe_branches(model, blocks=args.blocks, file=sys.stdout)
    return 1 if args.strict and report.uncovered else 0
