"""scikit-learn's 8x8 handwritten digits as a tiny image-classification datamodule (no download)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_sd.data.split_datamodule import SplitDataModule
from typing_extensions import override

__all__ = ["DigitsDataModule", "DIGITS_NUM_SAMPLES"]

#: Number of images in :func:`sklearn.datasets.load_digits`.
DIGITS_NUM_SAMPLES = 1797


def _split_sizes(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    num_test = round(total * test_fraction)
    num_val = round(total * val_fraction)
    return total - num_val - num_test, num_val, num_test


class DigitsDataModule(SplitDataModule):
    """The 1,797 8x8 grey-scale digits of :func:`sklearn.datasets.load_digits` as ``1 x S x S`` images.

    The data ship with scikit-learn, so nothing is downloaded. A random permutation drawn from ``seed``
    splits them into train / validation / test (``round(1797 * fraction)`` images for validation and
    test, the rest for training: 1257 / 270 / 270 with the defaults). Pixels (0..16) are divided by 16
    and, when ``normalize=True``, standardised with the mean and standard deviation of the training
    split. With ``image_size > 8`` the images are upsampled bilinearly once, in :meth:`setup`; the
    CIFAR ResNets of :mod:`lightning_sd.models` need ``image_size >= 4`` (two stride-2 stages).

    Args:
        batch_size: images per batch, >= 1.
        val_fraction: fraction of the 1797 images held out for validation, in [0, 1).
        test_fraction: fraction held out for testing, in [0, 1); ``val_fraction + test_fraction < 1``.
        image_size: side of the square images in pixels (8 = native), >= 1.
        normalize: standardise pixels with the training split's mean and std.
        seed: seed of the split permutation.
        num_workers: DataLoader worker processes (in-memory tensors: 0 is fastest).

    Example::

        >>> dm = DigitsDataModule(batch_size=32, image_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([32, 1, 16, 16]), torch.Size([32]))
    """

    num_classes: int = 10
    in_channels: int = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_size: int = 8,
        normalize: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            problems.append(
                f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {val_fraction} and {test_fraction}"
            )
        if image_size < 1:
            problems.append(f"image_size must be >= 1 pixel, got {image_size}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("DigitsDataModule: " + "; ".join(problems))
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.image_size = image_size
        self.normalize = normalize
        self.seed = seed
        self.num_workers = num_workers
        self.mean: Optional[float] = None
        self.std: Optional[float] = None
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """``(train, val, test)`` image counts."""
        return _split_sizes(DIGITS_NUM_SAMPLES, self.val_fraction, self.test_fraction)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the digits, split, rescale and (optionally) upsample them (idempotent)."""
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - scikit-learn is a dev dependency
            raise ImportError(
                "DigitsDataModule needs scikit-learn (it ships the digits): pip install scikit-learn"
            ) from err
        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(bunch.target, dtype=torch.long)
        if images.shape[0] != DIGITS_NUM_SAMPLES:  # pragma: no cover - guards a changed sklearn
            raise RuntimeError(f"expected {DIGITS_NUM_SAMPLES} digits from scikit-learn, got {images.shape[0]}")
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val, _ = self.split_sizes
        idx_train, idx_val, idx_test = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
        if self.normalize:
            train = images[idx_train]
            self.mean = float(train.mean())
            self.std = float(train.std())
            images = (images - self.mean) / self.std
        self.train_set = TensorDataset(images[idx_train], labels[idx_train])
        self.val_set = TensorDataset(images[idx_val], labels[idx_val])
        self.test_set = TensorDataset(images[idx_test], labels[idx_test])

