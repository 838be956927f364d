"""LightningDataModules: the SD paper's toy regression, scikit-learn digits, CIFAR-10/100."""

from lightning_sd.data.cifar import CIFARDataModule
from lightning_sd.data.digits import DigitsDataModule
from lightning_sd.data.toy_regression import ToyRegressionDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "ToyRegressionDataModule"]
