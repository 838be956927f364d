"""The only way probes and measurements read data: a private loader that leaves the run alone.

Every callback of the package that needs data outside the training step (SenseMode sensitivities,
``mode="maxreg"``'s regularization terms, :class:`~lightning_sd.RegularizationMonitor`,
:class:`~lightning_sd.NormalityMonitor`, :class:`~lightning_sd.LogGaussianMonitor`) reads it through
:func:`probe_batches` / :func:`probe_inputs`, so that a run with them attached ends exactly as the run
without them (observing never perturbs; docs/architecture.md). The rules:

- **A private loader.** The trainer's dataloader is only *read* (its ``dataset``, ``batch_size``,
  ``collate_fn``); the probe builds its own ``DataLoader`` over the same dataset, in the main process
  (``num_workers=0``), with its own sampler. The fit loop's iterator, sampler, sampler epoch and
  persistent workers are never touched (``iter()`` on a persistent-worker loader would reset the
  fit loop's worker iterator).
- **Which examples.** The training loader's order without its randomness: when its sampler is a
  ``SequentialSampler`` or a non-shuffling ``DistributedSampler`` (validation data, ``shuffle=False``)
  the probe reads the dataset in order; otherwise (a shuffling loader, any other sampler) it reads a
  fixed pseudo-random permutation, the same in every run (``torch.randperm`` of a ``torch.Generator``
  seeded with ``seed + epoch``; default seed 0), because many datasets are stored sorted by class.
  The probe sampler is a :class:`~torch.utils.data.DistributedSampler` with its own generator. It
  shards as the loader does: when the loader's sampler is a ``DistributedSampler`` (Lightning
  inserts one under DDP) the probe takes the same rank's share of the same size (every
  ``num_replicas``-th example of the order, starting at ``rank``); otherwise the whole dataset (a
  loader that is not sharded by a sampler reads all of its data on every rank, or its own per-rank
  dataset).
- **An IterableDataset** has no indices: its ``__iter__`` is called again from the start, in the main
  process (it shards itself under DDP, if it does). A stream that cannot be restarted must be given
  to the monitors as ``probe=`` tensors.
- **Any other iterable** (not a ``torch.utils.data.DataLoader``) is iterated afresh with ``iter()``;
  it must be re-iterable without side effects.
- **Several training dataloaders** (a list or dict, or a ``CombinedLoader``'s iterables): with
  ``combined=True`` (SenseMode, whose loss is ``training_step`` of the combined batch) each is
  replaced by its probe loader and they are combined in the fit loop's mode; otherwise (the
  monitors, which need one input tensor) the first one is read.
- **No global random number is consumed.** Everything runs under
  :func:`~lightning.pytorch.utilities.seed.isolate_rng` (torch CPU and CUDA, numpy, python):
  ``DataLoader.__iter__`` draws its base seed from the global torch generator and augmentations draw
  too, so without it a probe would shift the next epoch's shuffle and every later draw.
- **One input convention** (:func:`default_input_fn`): a tensor batch is the input; a tuple/list
  batch's input is ``batch[0]``; a dict batch's is the first of the keys ``"x"``, ``"input"``,
  ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"``. Anything else takes
  ``input_fn(batch) -> Tensor``. The monitors' older ``input_key=`` still works through
  :func:`resolve_input_fn` (a ``DeprecationWarning``; it becomes ``input_fn=lambda b: b[key]``).

Batches are moved to the module's device through ``trainer.strategy.batch_to_device`` (the
LightningModule's batch-transfer hooks run, as in training).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Generator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from lightning_sd._internals import fit_loop_combine_mode

__all__ = [
    "INPUT_KEYS",
    "default_input_fn",
    "probe_batches",
    "probe_inputs",
    "probe_loader",
    "resolve_input_fn",
]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")

ProbeSource = Literal["train", "val_or_train"]


def default_input_fn(batch: Any) -> Tensor:
    """The model input of a batch: the tensor itself, ``batch[0]`` of a tuple/list, or a known key of a dict.

    Raises:
        TypeError: the batch follows none of these conventions (the message names ``input_fn``).
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(
        f"cannot find the model inputs in a batch of type {type(batch).__name__}; the convention is (x, y) "
        f"tuples (x = batch[0]), dicts with one of the keys {INPUT_KEYS}, or a bare tensor. "
        "Pass input_fn=lambda batch: ... returning the tensor the model takes."
    )


class _ItemGetter:
    """``batch -> batch[key]`` (picklable, unlike a lambda); the deprecated ``input_key`` as an ``input_fn``."""

    def __init__(self, key: int | str) -> None:
        self.key = key

    def __call__(self, batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, Mapping) and self.key not in batch:
            raise KeyError(f"the batch has no key {self.key!r} (keys: {sorted(map(str, batch))}); set input_fn=lambda batch: ...")
        try:
            return batch[self.key]
        except (IndexError, TypeError) as err:
            raise TypeError(
                f"input_key={self.key!r} does not select the inputs of a batch of type {type(batch).__name__} ({err}); "
                "pass input_fn=lambda batch: ... instead"
            ) from err

    def __repr__(self) -> str:
        return f"itemgetter({self.key!r})"


def resolve_input_fn(owner: str, input_fn: Callable[[Any], Tensor] | None, input_key: int | str | None) -> Callable[[Any], Tensor] | None:
    """The ``input_fn`` of a callback that still accepts the deprecated ``input_key``.

    ``input_key=None`` (the new default) returns ``input_fn`` unchanged (``None``: :func:`default_input_fn`).
    A given ``input_key`` warns (``DeprecationWarning``) and becomes ``batch -> batch[input_key]``;
    both together are refused.
    """
    if input_key is None:
        return input_fn
    if input_fn is not None:
        raise ValueError(f"{owner}: pass input_fn= or the deprecated input_key=, not both")
    if not isinstance(input_key, (int, str)):
        raise TypeError(f"{owner}: input_key must be an int (tuple batches) or a str (dict batches), got {type(input_key).__name__}")
    warnings.warn(
        f"{owner}(input_key=...) is deprecated: every probe picks inputs the same way now. The default takes "
        f"batch[0] of tuples and the keys {INPUT_KEYS} of dicts; otherwise pass input_fn=lambda batch: batch[{input_key!r}].",
        DeprecationWarning,
        stacklevel=3,
    )
    return _ItemGetter(input_key)


def probe_loader(loader: Any, *, seed: int = 0, epoch: int = 0) -> Any:
    """A private, main-process loader over the data of ``loader`` (see the module docstring for the rules).

    Args:
        loader: a ``torch.utils.data.DataLoader`` (or any re-iterable, returned as is).
        seed: seed of the permutation of a shuffling ``loader`` (``DistributedSampler(seed=seed)``);
            unused for a sequential one.
        epoch: epoch of that permutation (``set_epoch(epoch)``), so each re-measurement reads other batches.

    Returns:
        A new ``DataLoader`` (``num_workers=0``), or ``loader`` itself when it is not a DataLoader.

    Raises:
        ValueError: a DataLoader with a custom ``batch_sampler`` that has no ``batch_size``.
    """
    if not isinstance(loader, DataLoader):
        return loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=0)
    if loader.batch_size is not None:
        batch_size: int | None = loader.batch_size
    elif loader.batch_sampler is None:
        batch_size = None  # automatic batching off: every item of the dataset is a batch
    else:
        batch_size = getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                f"the dataloader uses a batch_sampler ({type(loader.batch_sampler).__name__}) without a batch_size "
                "attribute, so a probe cannot form batches of the training size; give the monitor probe= tensors, "
                "or give the batch sampler a batch_size attribute"
            )
    rank, replicas = 0, 1
    if isinstance(loader.sampler, DistributedSampler):
        rank, replicas = loader.sampler.rank, loader.sampler.num_replicas
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=_shuffles(loader), seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=loader.collate_fn, num_workers=0)


def _shuffles(loader: DataLoader) -> bool:
    """Whether ``loader`` draws its order at random: anything but a sequential sampler counts as random."""
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return True


def _first(loaders: Any) -> Any:
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _source_loaders(trainer: pl.Trainer, source: ProbeSource) -> Any:
    if source == "val_or_train":
        val = getattr(trainer, "val_dataloaders", None)
        if _first(val) is not None:
            return val
    elif source != "train":
        raise ValueError(f"source must be 'train' or 'val_or_train', got {source!r}")
    return trainer.train_dataloader


def _device_batches(trainer: pl.Trainer, loaders: Any, combined: bool, seed: int, epoch: int) -> Generator[Any, None, None]:
    """Batches of the private probe loader(s), moved to the device; iterate it inside ``isolate_rng``."""
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables

    def fresh(loader: Any) -> Any:
        return probe_loader(loader, seed=seed, epoch=epoch)

    if combined and isinstance(loaders, (list, tuple, Mapping)):
        mode: Any = fit_loop_combine_mode(trainer)  # a CombinedLoader mode name
        if isinstance(loaders, Mapping):
            iterables: Any = {k: fresh(v) for k, v in loaders.items()}
        else:
            iterables = [fresh(v) for v in loaders]
        for item in CombinedLoader(iterables, mode=mode):
            yield trainer.strategy.batch_to_device(item[0], dataloader_idx=0)
    else:
        for batch in fresh(_first(loaders)):
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def _loaders(trainer: pl.Trainer, source: ProbeSource) -> Any:
    loaders = _source_loaders(trainer, source)
    if _first(loaders) is None:
        raise RuntimeError(
            "no dataloader to take probe data from yet: the training dataloader exists from on_train_start on. "
            "Give the monitor explicit probe= tensors to probe earlier."
        )
    return loaders


def probe_batches(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_batches: int,
    *,
    source: ProbeSource = "train",
    combined: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> list[Any]:
    """Up to ``num_batches`` batches of the private probe loader, on the module's device.

    Args:
        trainer: the running trainer (from ``on_train_start`` on the training dataloader exists).
        pl_module: the LightningModule (its batch-transfer hooks run).
        num_batches: how many batches at most (>= 1).
        source: ``"train"`` (the training data) or ``"val_or_train"`` (the first validation
            dataloader, else the training data).
        combined: several training dataloaders are combined as the fit loop combines them (the
            batch ``training_step`` takes); otherwise only the first is read.
        seed: seed of the probe permutation (see :func:`probe_loader`).
        epoch: epoch of the probe permutation (see :func:`probe_loader`).

    Returns:
        A list of batches (shorter than ``num_batches`` when the data is; empty when it is empty).

    Raises:
        RuntimeError: there is no dataloader to read (called before ``on_train_start``).

    Example::

        def on_train_start(self, trainer, pl_module):
            batches = probe_batches(trainer, pl_module, 4)   # the run's data order is untouched
    """
    if int(num_batches) != num_batches or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    loaders = _loaders(trainer, source)
    batches: list[Any] = []
    with isolate_rng(), contextlib.closing(_device_batches(trainer, loaders, combined, seed, epoch)) as stream:
        for batch in stream:
            batches.append(batch)
            if len(batches) >= num_batches:
                break
    return batches


def probe_inputs(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    max_examples: int | None = None,
    num_batches: int | None = None,
    source: ProbeSource = "train",
    input_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> list[Tensor]:
    """The model inputs of the probe batches (:func:`probe_batches`), at most ``max_examples`` in all.

    Args:
        trainer: as in :func:`probe_batches`.
        pl_module: as in :func:`probe_batches`.
        source: as in :func:`probe_batches` (the first dataloader is read).
        seed: as in :func:`probe_batches`.
        epoch: as in :func:`probe_batches`.
        max_examples: stop once this many inputs are collected (the last batch is cut); ``None``: no cap.
        num_batches: read at most this many batches; ``None``: as many as ``max_examples`` needs.
        input_fn: ``batch -> input tensor``; ``None``: :func:`default_input_fn`.

    Returns:
        A list of detached input tensors (batch first) on the module's device; empty when the data is.
    """
    if max_examples is None and num_batches is None:
        raise ValueError("give max_examples or num_batches")
    if max_examples is not None and (int(max_examples) != max_examples or max_examples < 1):
        raise ValueError(f"max_examples must be an integer >= 1, got {max_examples!r}")
    if num_batches is not None and (int(num_batches) != num_batches or num_batches < 1):
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    fn = input_fn or default_input_fn
    loaders = _loaders(trainer, source)
    inputs: list[Tensor] = []
    seen = 0
    with isolate_rng(), contextlib.closing(_device_batches(trainer, loaders, False, seed, epoch)) as stream:
        for batch in stream:
            x = fn(batch)
            if not isinstance(x, Tensor):
                raise TypeError(f"input_fn returned {type(x).__name__}; it must return the model's input tensor")
            if max_examples is not None:
                x = x[: max_examples - seen]
            seen += x.shape[0]
            inputs.append(x.detach())
            if (max_examples is not None and seen >= max_examples) or (num_batches is not None and len(inputs) >= num_batches):
                break
    return inputs
