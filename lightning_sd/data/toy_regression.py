"""The SD paper's toy regression task: learn ``x -> sin(beta^T x)`` with ``x, beta ~ N(0, I_d)``.

Hayou & Ayed (2021), section 6: "The toy regression task consists of estimating the function
``f_beta(x) = sin(beta^T x)``, where the inputs x and parameter beta are in R^256, sampled from a
standard Gaussian."
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_sd.data.split_datamodule import SplitDataModule
from typing_extensions import override

__all__ = ["ToyRegressionDataModule", "make_toy_regression"]


def make_toy_regression(
    num_samples: int,
    beta: Tensor,
    noise_std: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``num_samples`` pairs ``(x, sin(beta^T x) + noise_std * eps)`` with ``x ~ N(0, I_d)``.

    Args:
        num_samples: number of pairs to draw (>= 0).
        beta: the fixed parameter, shape ``(d,)``.
        noise_std: standard deviation of the additive Gaussian target noise (>= 0).
        generator: torch generator to draw from (the global RNG when ``None``).

    Returns:
        ``x`` of shape ``(num_samples, d)`` and targets of shape ``(num_samples, 1)``, both float32.
    """
    x = torch.randn(num_samples, beta.numel(), generator=generator)
    y = torch.sin(x @ beta).unsqueeze(1)
    if noise_std > 0:
        y = y + noise_std * torch.randn(num_samples, 1, generator=generator)
    return x, y


class ToyRegressionDataModule(SplitDataModule):
    """Synthetic regression ``y = sin(beta^T x) (+ noise)`` of the SD paper, generated from a seed.

    ``beta ~ beta_scale * N(0, I_d)`` is drawn once; train, validation and test inputs are independent
    draws ``x ~ N(0, I_d)``. Everything is generated deterministically from ``seed`` in :meth:`setup`
    (nothing is downloaded or written to disk), so two datamodules with the same arguments hold
    bit-identical tensors.

    With the paper's definition (``beta_scale=1``) ``beta^T x`` has variance ``d = 256``, so the target
    oscillates on a scale of ``1/16`` of the input's standard deviation: it is close to unlearnable noise
    of variance ~0.5 for unseen inputs and the task mostly measures how well a deep network fits its
    training set. ``beta_scale = 1/sqrt(in_features)`` (pass ``beta_scale=0.0625`` for d = 256) gives
    ``beta^T x ~ N(0, 1)``, a smooth target that generalises.

    Args:
        in_features: input dimension d (256 in the paper), >= 1.
        num_train: training pairs, >= 1.
        num_val: validation pairs, >= 0 (0 disables validation).
        num_test: test pairs, >= 0.
        batch_size: pairs per batch, >= 1.
        noise_std: standard deviation of Gaussian noise added to the training, validation and test
            targets (0 in the paper), >= 0.
        beta_scale: multiplier of the standard-Gaussian ``beta`` (1 in the paper; ``1/sqrt(d)`` makes
            ``beta^T x`` standard normal), > 0.
        seed: seed of the generator that draws ``beta`` and the three splits.
        num_workers: DataLoader worker processes (the data are in-memory tensors: 0 is fastest).
        shuffle: reshuffle the training set every epoch.

    Example::

        >>> dm = ToyRegressionDataModule(num_train=512, num_val=128, num_test=128, batch_size=64)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([64, 256]), torch.Size([64, 1]))
    """

    def __init__(
        self,
        in_features: int = 256,
        num_train: int = 2048,
        num_val: int = 512,
        num_test: int = 512,
        batch_size: int = 128,
        noise_std: float = 0.0,
        beta_scale: float = 1.0,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        problems = []
        if in_features < 1:
            problems.append(f"in_features must be >= 1, got {in_features}")
        if num_train < 1:
            problems.append(f"num_train must be >= 1, got {num_train}")
        if num_val < 0 or num_test < 0:
            problems.append(f"num_val and num_test must be >= 0, got {num_val} and {num_test}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not noise_std >= 0 or not math.isfinite(noise_std):
            problems.append(f"noise_std must be a finite number >= 0, got {noise_std}")
        if not beta_scale > 0 or not math.isfinite(beta_scale):
            problems.append(f"beta_scale must be a finite number > 0 (1/sqrt(in_features) for N(0,1) phases), got {beta_scale}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("ToyRegressionDataModule: " + "; ".join(problems))
        self.save_hyperparameters()
        self.in_features = in_features
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.batch_size = batch_size
        self.noise_std = noise_std
        self.beta_scale = beta_scale
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.shuffle_train = shuffle
        self.beta: Optional[Tensor] = None
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Generate ``beta`` and all three splits (cheap; idempotent)."""
        if self.beta is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        self.beta = self.beta_scale * torch.randn(self.in_features, generator=g)
        self.train_set = TensorDataset(*make_toy_regression(self.num_train, self.beta, self.noise_std, g))
        self.val_set = TensorDataset(*make_toy_regression(self.num_val, self.beta, self.noise_std, g))
        self.test_set = TensorDataset(*make_toy_regression(self.num_test, self.beta, self.noise_std, g))
