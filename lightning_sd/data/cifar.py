"""CIFAR-10 / CIFAR-100 through :mod:`torchvision.datasets`, with the usual augmentation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_sd.data.split_datamodule import SplitDataModule
from typing_extensions import override

__all__ = ["CIFARDataModule", "CIFAR_MEAN", "CIFAR_STD", "CIFAR10Unverified", "CIFAR100Unverified"]

#: Per-channel mean and standard deviation of the training images (RGB, pixels in [0, 1]).
CIFAR_MEAN: dict[int, tuple[float, float, float]] = {
    10: (0.4914, 0.4822, 0.4465),
    100: (0.5071, 0.4865, 0.4409),
}
CIFAR_STD: dict[int, tuple[float, float, float]] = {
    10: (0.2470, 0.2435, 0.2616),
    100: (0.2673, 0.2564, 0.2762),
}


class CIFAR10Unverified(CIFAR10):
    """:class:`~torchvision.datasets.CIFAR10` that checks the files exist but not their md5 sums.

    torchvision's ``check_integrity(path, md5=None)`` only tests that the file exists, so nulling the
    md5s keeps torchvision's own loading code (pickles, ``batches.meta``) unchanged.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR100Unverified(CIFAR100):
    """:class:`~torchvision.datasets.CIFAR100` that checks the files exist but not their md5 sums."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_UNVERIFIED: dict[type[CIFAR10], type[CIFAR10]] = {CIFAR10: CIFAR10Unverified, CIFAR100: CIFAR100Unverified}


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100 with random-crop / flip augmentation and a seeded validation split.

    Reads torchvision's on-disk format (``<data_dir>/cifar-10-batches-py`` or
    ``<data_dir>/cifar-100-python``) with :class:`torchvision.datasets.CIFAR10` /
    :class:`~torchvision.datasets.CIFAR100`. Nothing is downloaded unless ``download=True``; missing
    files raise a :class:`FileNotFoundError` that names the directory and the flag.

    Training images get ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()`` (He et al. 2016,
    Huang et al. 2016) when ``augment=True``; every split is normalised with the standard per-channel
    mean / std of :data:`CIFAR_MEAN` / :data:`CIFAR_STD`. ``num_val`` images, chosen by a permutation
    drawn from ``seed``, are carved out of the 50,000 training images and evaluated without
    augmentation (Huang et al. used 45,000 / 5,000). With ``num_val=0`` the validation loader serves
    the 10,000 test images, as in papers that report the test error of the final epoch.

    Args:
        data_dir: directory that holds (or will hold, with ``download=True``) the extracted dataset.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
        batch_size: images per batch, >= 1 (128 in the SD papers).
        num_val: training images held out for validation, in [0, 50000).
        seed: seed of the validation split.
        augment: random crop (padding 4 pixels) and horizontal flip on the training split.
        download: download the dataset into ``data_dir`` if it is not there (needs network access).
        verify_checksums: check the md5 sums of the files (torchvision's default). Set ``False`` for a
            locally generated or re-packed dataset in the same format.
        num_workers: DataLoader worker processes, >= 0.
        pin_memory: pin host memory of the batches (faster host-to-GPU copies).

    Example::

        >>> dm = CIFARDataModule("~/data", num_classes=100, download=True)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> len(dm.train_set), len(dm.val_set)  # doctest: +SKIP
        (45000, 5000)
    """

    in_channels: int = 3

    def __init__(
        self,
        data_dir: Union[str, Path] = "data",
        num_classes: Literal[10, 100] = 10,
        batch_size: int = 128,
        num_val: int = 5000,
        seed: int = 0,
        augment: bool = True,
        download: bool = False,
        verify_checksums: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        problems = []
        if num_classes not in (10, 100):
            problems.append(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= num_val < 50000:
            problems.append(f"num_val must be in [0, 50000), got {num_val}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("CIFARDataModule: " + "; ".join(problems))
        self.save_hyperparameters()
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.num_classes = int(num_classes)
        self.batch_size = batch_size
        self.num_val = num_val
        self.seed = seed
        self.augment = augment
        self.download = download
        self.verify_checksums = verify_checksums
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @property
    def name(self) -> str:  # type: ignore[override]  # LightningDataModule declares a plain ``name`` attribute
        """``"CIFAR-10"`` or ``"CIFAR-100"``."""
        return f"CIFAR-{self.num_classes}"

    @property
    def dataset_class(self) -> type[CIFAR10]:
        """The torchvision dataset class that reads the files (md5-free subclass if not verifying)."""
        cls = CIFAR10 if self.num_classes == 10 else CIFAR100
        return cls if self.verify_checksums else _UNVERIFIED[cls]

    @property
    def dataset_dir(self) -> Path:
        """``<data_dir>/cifar-10-batches-py`` or ``<data_dir>/cifar-100-python``."""
        return self.data_dir / self.dataset_class.base_folder

    def missing_files(self) -> list[str]:
        """Names of the dataset files absent from :attr:`dataset_dir` (empty when complete)."""
        cls = self.dataset_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [name for name in names if not (self.dataset_dir / name).is_file()]

    def _check_present(self) -> None:
        missing = self.missing_files()
        if missing:
            raise FileNotFoundError(
                f"{self.name} not found: {self.dataset_dir} lacks {', '.join(missing)}. "
                f"Pass download=True (CLI: --data.download true) to download it into {self.data_dir}, "
                f"or set data_dir (CLI: --data.data_dir) to the directory that contains "
                f"'{self.dataset_class.base_folder}'."
            )

    def train_transform(self) -> T.Compose:
        """Augmentation (if enabled), tensor conversion and normalisation for training images."""
        ops: list = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose([*ops, *self.eval_transform().transforms])

    def eval_transform(self) -> T.Compose:
        """Tensor conversion and normalisation for validation and test images."""
        return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN[self.num_classes], CIFAR_STD[self.num_classes])])

    @override
    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` (runs on one process); else check it is there."""
        if self.download:
            cls = CIFAR10 if self.num_classes == 10 else CIFAR100
            cls(str(self.data_dir), train=True, download=True)
            cls(str(self.data_dir), train=False, download=True)
        else:
            self._check_present()

    def _open(self, train: bool, transform: T.Compose) -> CIFAR10:
        try:
            return self.dataset_class(str(self.data_dir), train=train, transform=transform, download=False)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.name} files in {self.dataset_dir} exist but failed torchvision's md5 check ({err}). "
                f"Re-download them (delete the directory and pass download=True) or, for a locally "
                f"generated or re-packed copy, pass verify_checksums=False (CLI: --data.verify_checksums false)."
            ) from err

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Open the splits that ``stage`` needs (``fit``/``validate``: train+val, ``test``: test)."""
        self._check_present()
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_full = self._open(True, self.train_transform())
            n = len(train_full)
            if self.num_val >= n:
                raise ValueError(f"CIFARDataModule: num_val={self.num_val} leaves no training images (the split has {n})")
            if self.num_val > 0:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
                self.train_set = Subset(train_full, perm[self.num_val :])
                self.val_set = Subset(self._open(True, self.eval_transform()), perm[: self.num_val])
            else:
                self.train_set = train_full
                self.val_set = self._open(False, self.eval_transform())
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._open(False, self.eval_transform())

    @override
    def _loader_options(self) -> dict:
        return {"pin_memory": self.pin_memory and torch.cuda.is_available()}
