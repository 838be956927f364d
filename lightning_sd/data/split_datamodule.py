"""The dataloaders shared by the package's datamodules: train/val/test splits held as datasets."""

from __future__ import annotations

from typing import Any, Optional

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

__all__ = ["SplitDataModule"]


class SplitDataModule(LightningDataModule):
    """Serves ``train_set``/``val_set``/``test_set`` (set by a subclass's ``setup``) as dataloaders.

    Subclasses set ``batch_size`` and ``num_workers`` in ``__init__``; ``shuffle_train`` (default True)
    and ``_loader_options`` (extra ``DataLoader`` arguments) adapt it. ``predict_dataloader`` serves the
    test split.
    """

    train_set: Optional[Dataset] = None
    val_set: Optional[Dataset] = None
    test_set: Optional[Dataset] = None
    batch_size: int
    num_workers: int
    shuffle_train: bool = True

    def _loader_options(self) -> dict[str, Any]:
        return {}

    def _loader(self, dataset: Optional[Dataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() with the right stage before asking for this dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **self._loader_options(),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.shuffle_train)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test split (``lightning-sd predict`` / ``Trainer.predict``)."""
        return self._loader(self.test_set, False)
