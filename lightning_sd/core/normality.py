"""Monte-Carlo stochastic-depth masks -> normality-test p-values (Hayou & Ayed 2021, Theorem 2, Fig. 5).

Theorem 2: in a deep (Stable) ResNet, the randomness that stochastic depth adds to a neuron,
``y^i(x; delta) - y^i(x; p)``, tends to a Gaussian ``N(0, alpha v(x))`` as the depth grows, i.e. SD
acts as data-adaptive Gaussian noise injection. The check of Fig. 5: for each input x draw M masks
``delta ~ Bernoulli(p)``, record one fixed neuron of the output (and of every block's output) for
each mask, and run a normality test over the M values. Gaussian behaviour shows up as p-values that
look uniform on [0, 1] (median about 0.5, about 95% above 0.05); a shallow network, whose output takes
at most ``2^L`` values, gives p-values near 0.

The M masked passes of all inputs run as **one replicated batch**: row ``(i, j)`` of the batch is input
``i`` under mask ``j``, and the masks enter as per-example gates through
:meth:`~lightning_sd.core.gates.StochasticDepthHandle.override` (``m`` of shape ``(rows, L)``),
chunked to at most ``chunk_size`` rows per forward. This is torch only (no Lightning).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from lightning_sd.core.discovery import ResidualBranch
from lightning_sd.core.gates import (
    ResidualGate,
    StochasticDepthHandle,
    existing_handle,
    mask_generator,
    probe_gates,
)
from lightning_sd.core.probing import model_float_dtype, restored_state
from lightning_sd.core.validation import SCALINGS, check_choice, resolve_survival

__all__ = [
    "NORMALITY_TESTS",
    "NormalityResult",
    "masked_samples",
    "normality_pvalues",
    "normality_test",
    "sample_multipliers",
    "summarize",
]

NORMALITY_TESTS = ("shapiro", "dagostino")
_SHAPIRO_MIN, _SHAPIRO_MAX = 3, 5000
_DAGOSTINO_MIN, _DAGOSTINO_KURTOSIS_MIN = 8, 20
_MASK_STREAM = 0x4E4F524D  # "NORM": keeps the probe's masks apart from the training mask stream


@dataclass(frozen=True)
class NormalityResult:
    """p-values of :func:`normality_pvalues`.

    Attributes:
        pvalues: float64 tensor ``(N,)``, one p-value per input for the output neuron (NaN where the
            M values are all equal, e.g. when every rate is 1).
        block_pvalues: float64 tensor ``(N, L)`` for one neuron of every block's output
            (``per_block=True``), else None. Column ``l - 1`` is block l.
        test: the test used, ``"shapiro"`` or ``"dagostino"``.
        num_masks: M, the number of masks per input.
    """

    pvalues: Tensor
    block_pvalues: Tensor | None
    test: str
    num_masks: int

    def median(self) -> float:
        """Median p-value of the output neuron over inputs (NaNs ignored)."""
        p = self.pvalues[~torch.isnan(self.pvalues)]
        return float(np.median(p.numpy())) if p.numel() else float("nan")

    def fraction_above(self, alpha: float = 0.05) -> float:
        """Fraction of inputs whose output p-value exceeds ``alpha`` (about ``1 - alpha`` if Gaussian)."""
        p = self.pvalues[~torch.isnan(self.pvalues)]
        return float((p > alpha).double().mean()) if p.numel() else float("nan")

    def block_medians(self) -> Tensor | None:
        """Median p-value of each block over inputs, float64 ``(L,)`` (Fig. 5 right), or None."""
        if self.block_pvalues is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (constant blocks) stay NaN
            return torch.from_numpy(np.nanmedian(self.block_pvalues.numpy(), axis=0))


def check_normality_test(test: str, num_masks: int) -> None:
    """Sample-size limits of the scipy tests, checked before any forward pass."""
    if test not in NORMALITY_TESTS:
        raise ValueError(f"unknown test={test!r}; choose 'shapiro' (scipy.stats.shapiro) or 'dagostino' (scipy.stats.normaltest)")
    if int(num_masks) != num_masks:
        raise ValueError(f"num_masks must be an integer, got {num_masks!r}")
    if test == "shapiro":
        if num_masks < _SHAPIRO_MIN:
            raise ValueError(
                f"Shapiro-Wilk needs at least {_SHAPIRO_MIN} samples per input, got num_masks={num_masks}; "
                "use num_masks=200 (the paper's)"
            )
        if num_masks > _SHAPIRO_MAX:
            warnings.warn(
                f"num_masks={num_masks} > {_SHAPIRO_MAX}: scipy's Shapiro-Wilk p-value may be inaccurate for N > 5000; "
                "use test='dagostino' or fewer masks",
                UserWarning,
                stacklevel=3,
            )
    else:
        if num_masks < _DAGOSTINO_MIN:
            raise ValueError(
                f"D'Agostino-Pearson (scipy.stats.normaltest) needs at least {_DAGOSTINO_MIN} samples per input, "
                f"got num_masks={num_masks}; use num_masks >= {_DAGOSTINO_KURTOSIS_MIN + 1} (its kurtosis test is valid for N > 20)"
            )
        if num_masks <= _DAGOSTINO_KURTOSIS_MIN:
            warnings.warn(
                f"num_masks={num_masks}: the kurtosis part of scipy.stats.normaltest is only valid for N > {_DAGOSTINO_KURTOSIS_MIN}; "
                "p-values are unreliable. Use more masks.",
                UserWarning,
                stacklevel=3,
            )


def normality_test(samples: Tensor | np.ndarray, test: str = "shapiro", *, constant_rtol: float = 1e-12) -> Tensor:
    """p-values of a normality test along the last axis (one test per row).

    ``"shapiro"`` is :func:`scipy.stats.shapiro`, ``"dagostino"`` :func:`scipy.stats.normaltest`. A row
    whose values are all equal (a point mass) gets NaN: neither test is defined for it.

    Args:
        samples: ``(..., M)`` values, M masks per row.
        test: ``"shapiro"`` or ``"dagostino"``.
        constant_rtol: a row whose range is at most ``constant_rtol * max|value|`` counts as constant
            (rounding noise of a deterministic network is not a distribution).

    Returns:
        float64 tensor of shape ``samples.shape[:-1]``.
    """
    x = samples.detach().cpu().double().numpy() if isinstance(samples, Tensor) else np.asarray(samples, dtype=np.float64)
    check_normality_test(test, x.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    out = np.full(flat.shape[0], np.nan)
    spread = flat.max(axis=1) - flat.min(axis=1)
    scale = np.maximum(np.abs(flat).max(axis=1), 1e-300)
    ok = spread > float(constant_rtol) * scale
    if ok.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the size limits were checked (and warned about) above
            warnings.simplefilter("ignore", RuntimeWarning)
            if test == "shapiro":
                res = stats.shapiro(flat[ok], axis=-1)
            else:
                res = stats.normaltest(flat[ok], axis=-1)
        out[ok] = np.asarray(res.pvalue, dtype=np.float64)
    return torch.from_numpy(out.reshape(x.shape[:-1]))


def sample_multipliers(
    survival: Sequence[float] | Tensor,
    num_inputs: int,
    num_masks: int,
    *,
    scaling: str = "expected",
    seed: int = 0,
) -> Tensor:
    """Independent masks for each input: ``m = delta`` or ``delta / p``, ``delta ~ Bernoulli(p)``.

    Args:
        survival: rates p_1..p_L, each in [0, 1] (no zero with ``scaling="inverted"``).
        num_inputs: N.
        num_masks: M masks per input.
        scaling: ``"expected"`` (m = delta, the paper's) or ``"inverted"`` (m = delta / p).
        seed: the masks come from :func:`~lightning_sd.core.gates.mask_generator` ``(seed, ...)``,
            independent of the global RNG.

    Returns:
        float64 tensor ``(N, M, L)``.
    """
    check_choice("scaling", scaling, SCALINGS)
    p = torch.as_tensor(survival, dtype=torch.float64).flatten()
    if scaling == "inverted" and bool((p == 0).any()):
        raise ValueError("a survival rate of 0 with scaling='inverted' divides by zero (m = delta/p); use scaling='expected'")
    g = mask_generator(int(seed), _MASK_STREAM)
    u = torch.rand(int(num_inputs), int(num_masks), p.numel(), generator=g, dtype=torch.float64)
    delta = (u < p).double()
    return delta / p if scaling == "inverted" else delta


@contextlib.contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (BatchNorm running statistics, no dropout) and no grad; modes and buffers restored."""
    with restored_state(model, "eval"), torch.no_grad():
        yield


def _block_output_modules(handle: StochasticDepthHandle, model: nn.Module) -> list[nn.Module]:
    """The module whose output is "the block output" y_l of each branch (see :func:`normality_pvalues`)."""
    modules: list[nn.Module] = []
    for gate, branch in zip(handle.gates, handle.branches):
        if isinstance(gate, ResidualGate):
            modules.append(gate)
        else:
            modules.append(model.get_submodule(branch.block) if branch.block else model)
    return modules


def _pick(t: object, neuron: int, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} is a {type(t).__name__}, not a tensor; normality probes need a model (and blocks) returning tensors")
    flat = t.reshape(t.shape[0], -1)
    if not -flat.shape[1] <= neuron < flat.shape[1]:
        raise IndexError(f"neuron={neuron} is out of range for the {what} with {flat.shape[1]} values per example")
    return flat[:, neuron]


def masked_samples(
    model: nn.Module,
    inputs: Tensor,
    multipliers: Tensor,
    *,
    neuron: int = 0,
    per_block: bool = False,
    block_neuron: int | None = None,
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor | None]:
    """Values of one output neuron (and one neuron of every block's output) under explicit masks.

    Row ``(i, j)`` of the replicated batch is ``inputs[i]`` with multipliers ``multipliers[i, j]``; the
    rows run in chunks of ``chunk_size`` through ``handle.override(m)`` with ``m`` of shape
    ``(rows, L)``, one forward per chunk, in evaluation mode and without grad.

    Args:
        model: plain or injected residual model.
        inputs: ``(N, ...)`` probe inputs, one per example.
        multipliers: ``(N, M, L)`` multipliers ``m`` (already scaled: ``delta`` or ``delta/p``).
        neuron: index into the flattened per-example model output.
        per_block: also record the block outputs.
        block_neuron: index into each flattened per-example block output (default: ``neuron``).
        chunk_size: rows per forward (>= 1): bounds memory to about ``chunk_size`` examples' activations.

    Returns:
        ``(output, blocks)``: float64 ``(N, M)`` and float64 ``(N, M, L)`` (None unless ``per_block``).
    """
    if inputs.ndim < 1 or multipliers.ndim != 3 or multipliers.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"multipliers must have shape (N, M, L) with N = inputs.shape[0] = {inputs.shape[0] if inputs.ndim else '?'}, "
            f"got {tuple(multipliers.shape)}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
    n, m_count, num_blocks = multipliers.shape
    block_neuron = neuron if block_neuron is None else block_neuron
    with probe_gates(model) as (handle, _):
        if handle.num_blocks != num_blocks:
            raise ValueError(f"multipliers have L = {num_blocks} but the model has {handle.num_blocks} residual branches")
        device = inputs.device
        dtype = model_float_dtype(model)
        x_all = inputs.to(dtype) if inputs.is_floating_point() else inputs
        m_all = multipliers.reshape(n * m_count, num_blocks).to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
        out = torch.empty(n * m_count, dtype=torch.float64)
        blocks = torch.empty(n * m_count, num_blocks, dtype=torch.float64) if per_block else None
        captured: list[Tensor | None] = [None] * num_blocks
        hooks = []
        if per_block:
            for block, module in enumerate(_block_output_modules(handle, model)):
                def hook(_mod: nn.Module, _args: object, output: object, block: int = block) -> None:
                    captured[block] = _pick(output, block_neuron, f"output of block {block + 1}")

                hooks.append(module.register_forward_hook(hook))
        try:
            with _probe_mode(model):
                for start in range(0, n * m_count, int(chunk_size)):
                    rows = torch.arange(start, min(start + int(chunk_size), n * m_count), device=device)
                    x = x_all.index_select(0, rows // m_count)
                    with handle.override(m_all.index_select(0, rows)):
                        y = model(x)
                    out[start : start + rows.numel()] = _pick(y, neuron, "model output").double().cpu()
                    if blocks is not None:
                        for block in range(num_blocks):
                            v = captured[block]
                            if v is None:
                                raise RuntimeError(f"block {block + 1} ({handle.branches[block].name}) did not run in the forward pass")
                            blocks[start : start + rows.numel(), block] = v.double().cpu()
                            captured[block] = None
        finally:
            for h in hooks:
                h.remove()
    return out.reshape(n, m_count), None if blocks is None else blocks.reshape(n, m_count, num_blocks)


def normality_pvalues(
    model: nn.Module,
    inputs: Tensor,
    survival: float | Sequence[float] | Tensor | Callable[[int], Tensor] | None = None,
    *,
    num_masks: int = 200,
    test: str = "shapiro",
    neuron: int = 0,
    per_block: bool = False,
    block_neuron: int | None = None,
    scaling: str | None = None,
    seed: int = 0,
    chunk_size: int = 4096,
) -> NormalityResult:
    r"""Normality-test p-value of one output neuron under stochastic-depth masks, per input (Fig. 5).

    For each input x, ``num_masks`` masks ``delta ~ Bernoulli(p)`` give the values
    ``y^i(x; m)``, ``m = delta`` (``"expected"``) or ``delta / p`` (``"inverted"``), of output neuron
    ``i = neuron``; the test's p-value over these M values is returned. Theorem 2 (Hayou & Ayed 2021):
    ``y^i(x; delta) ~ y^i(x; p) + gamma(x)`` with ``gamma(x) -> N(0, alpha v(x))`` as L grows, so deep
    Stable ResNets give p-values spread over [0, 1] and shallow ones p-values near 0.

    The probe runs in evaluation mode (BatchNorm uses running statistics) without grad, the masked
    passes batched (see :func:`masked_samples`); the model's training flags are restored afterwards.
    Plain models get temporary gates, removed afterwards; an injected model keeps its rates.

    "The block output" of block l (``per_block=True``) is ``y_l = shortcut + m_l f_l(y_{l-1})``, the
    residual stream right after the add, i.e. the output of the gate (before any activation a block
    applies after its add, as torchvision's BasicBlock does). For a block found through a drop-path
    slot (no traced add) it is the output of the block module.

    Args:
        model: residual model, plain or injected (:func:`~lightning_sd.inject_stochastic_depth`).
        inputs: ``(N, ...)`` probe inputs, N >= 1 (the paper: 256-dim standard Gaussians).
        survival: rates p_1..p_L in [0, 1] (float, sequence, tensor or ``L -> rates``). None: the
            injected model's current rates.
        num_masks: M masks per input (paper: 200); shapiro needs M >= 3 (warns above 5000),
            dagostino M >= 8 (warns for M <= 20).
        test: ``"shapiro"`` (:func:`scipy.stats.shapiro`) or ``"dagostino"`` (:func:`scipy.stats.normaltest`).
        neuron: index into the flattened per-example output (the "fixed output neuron").
        per_block: also test one neuron of every block's output (Fig. 5 right).
        block_neuron: index into each flattened block output (default ``neuron``).
        scaling: ``"expected"`` or ``"inverted"``; None: the handle's scaling, ``"expected"`` (the
            paper's m = delta) for a plain model.
        seed: seed of the masks (:func:`sample_multipliers`), independent of the global RNG.
        chunk_size: rows (input x mask pairs) per forward pass, >= 1.

    Returns:
        :class:`NormalityResult` with ``pvalues`` ``(N,)`` and, with ``per_block``, ``block_pvalues`` ``(N, L)``.

    Example::

        >>> model = ResidualMLP(256, width=128, depth=100, out_features=1, stable=True)
        >>> res = normality_pvalues(model, torch.randn(64, 256), 0.7)
        >>> res.median() > 0.05   # Gaussian noise at depth 100 (Fig. 5)
        True
    """
    check_normality_test(test, num_masks)
    if scaling is not None:
        check_choice("scaling", scaling, SCALINGS)
    if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a tensor of shape (N, ...) with N >= 1 probe inputs")
    handle = existing_handle(model)
    if survival is None:
        if handle is None:
            raise ValueError("survival=None needs a model with stochastic-depth gates; pass survival= (e.g. 0.7 or a list of L rates)")
        p = handle.survival.double()
    else:
        num_blocks = handle.num_blocks if handle is not None else len(_count_branches(model))
        p = resolve_survival(survival, num_blocks)
    scaling = scaling or (handle.scaling if handle is not None else "expected")
    masks = sample_multipliers(p, inputs.shape[0], num_masks, scaling=scaling, seed=seed)
    out, blocks = masked_samples(
        model, inputs, masks, neuron=neuron, per_block=per_block, block_neuron=block_neuron, chunk_size=chunk_size
    )
    # Batched rows of one input under equal masks differ by rounding only (summation order): count a
    # spread below 256 machine epsilons of the model's dtype as a point mass.
    rtol = 256 * torch.finfo(model_float_dtype(model)).eps
    return NormalityResult(
        pvalues=normality_test(out, test, constant_rtol=rtol),
        block_pvalues=None if blocks is None else normality_test(blocks.transpose(1, 2), test, constant_rtol=rtol),
        test=test,
        num_masks=int(num_masks),
    )


def _count_branches(model: nn.Module) -> list[ResidualBranch]:
    from lightning_sd.core.discovery import find_residual_branches

    branches = find_residual_branches(model)
    if not branches:
        raise ValueError(f"found no residual branch in {type(model).__name__}; normality probes need a residual model")
    return branches


def summarize(pvalues: Tensor, alpha: float = 0.05) -> dict[str, float]:
    """Median, fraction above ``alpha`` and quartiles of p-values (NaNs ignored)."""
    p = pvalues.double().flatten()
    p = p[~torch.isnan(p)]
    if p.numel() == 0:
        return {"median": math.nan, "frac_above": math.nan, "q25": math.nan, "q75": math.nan}
    q = np.quantile(p.numpy(), [0.25, 0.5, 0.75])
    return {"median": float(q[1]), "frac_above": float((p > alpha).double().mean()), "q25": float(q[0]), "q75": float(q[2])}
