"""Datamodules: shapes, split sizes, determinism; CIFAR read from a generated torchvision-format copy."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule
from lightning_sd.data.cifar import CIFAR_MEAN, CIFAR_STD


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make these tests ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- toy regression


def test_toy_regression_shapes_and_targets() -> None:
    dm = ToyRegressionDataModule(in_features=16, num_train=100, num_val=30, num_test=20, batch_size=32, seed=3)
    dm.setup("fit")
    assert dm.beta is not None and dm.beta.shape == (16,)
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [100, 30, 20]
    x, y = dm.train_set.tensors
    assert x.shape == (100, 16) and y.shape == (100, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    torch.testing.assert_close(y, torch.sin(x @ dm.beta).unsqueeze(1), rtol=0, atol=0)
    batches = list(dm.train_dataloader())
    assert [b[0].shape[0] for b in batches] == [32, 32, 32, 4]
    assert len(dm.val_dataloader()) == 1 and len(dm.test_dataloader()) == 1
    assert torch.equal(next(iter(dm.predict_dataloader()))[0], dm.test_set.tensors[0])


def test_toy_regression_is_deterministic_in_the_seed() -> None:
    a, b, c = (ToyRegressionDataModule(in_features=8, num_train=50, num_val=10, num_test=10, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    for name in ("train_set", "val_set", "test_set"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.beta, c.beta)
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    # train, val and test inputs are different draws
    assert not torch.equal(a.val_set.tensors[0], a.test_set.tensors[0])


def test_toy_regression_beta_scale_and_noise() -> None:
    base = ToyRegressionDataModule(in_features=256, num_train=4000, num_val=0, num_test=0, seed=0)
    scaled = ToyRegressionDataModule(in_features=256, num_train=4000, num_val=0, num_test=0, seed=0, beta_scale=1 / 16)
    noisy = ToyRegressionDataModule(in_features=256, num_train=4000, num_val=0, num_test=0, seed=0, noise_std=0.1)
    for dm in (base, scaled, noisy):
        dm.setup()
    torch.testing.assert_close(scaled.beta, base.beta / 16)
    # phases beta^T x: variance d = 256 with the paper's beta, 1 with beta_scale = 1/sqrt(d)
    x = base.train_set.tensors[0]
    assert (x @ base.beta).var().item() == pytest.approx(256 * base.beta.pow(2).mean().item(), rel=0.1)
    assert (x @ scaled.beta).var().item() == pytest.approx(1.0, rel=0.15)
    # sin of a wide Gaussian has variance (1 - exp(-2 * 256)) / 2 ~ 0.5
    assert base.train_set.tensors[1].var().item() == pytest.approx(0.5, abs=0.03)
    # noise is drawn after the training inputs: same beta and x as without noise, residuals of std 0.1
    xn, yn = noisy.train_set.tensors
    assert torch.equal(noisy.beta, base.beta) and torch.equal(xn, x)
    residual = yn - torch.sin(xn @ noisy.beta).unsqueeze(1)
    assert residual.std().item() == pytest.approx(0.1, rel=0.05)
    assert len(noisy.val_dataloader()) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 0}, "in_features must be >= 1"),
        ({"num_train": 0}, "num_train must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"noise_std": -1.0}, "noise_std must be"),
        ({"beta_scale": 0.0}, "beta_scale must be"),
    ],
)
def test_toy_regression_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToyRegressionDataModule(**kwargs)


def test_toy_regression_dataloader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="call setup"):
        ToyRegressionDataModule().train_dataloader()


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes_cover_the_dataset() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(batch_size=100, seed=0)
    dm.setup("fit")
    assert dm.split_sizes == (1257, 270, 270)
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [1257, 270, 270]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.long
    # the three splits partition the 1797 images: per-class counts add up to the full histogram
    counts = sum(torch.bincount(s.tensors[1], minlength=10) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert counts.tolist() == np.bincount(load_digits().target, minlength=10).tolist()
    # normalised with the training split's statistics
    train_x = dm.train_set.tensors[0]
    assert train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-5)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    raw_train = torch.as_tensor(load_digits().images, dtype=torch.float32)[perm[:1257]] / 16.0
    assert dm.mean == pytest.approx(raw_train.mean().item(), rel=1e-6)
    assert dm.std == pytest.approx(raw_train.std().item(), rel=1e-6)
    assert torch.equal(dm.train_set.tensors[1], torch.as_tensor(load_digits().target)[perm[:1257]])


def test_digits_is_deterministic_and_seed_dependent() -> None:
    a, b, c = DigitsDataModule(seed=5), DigitsDataModule(seed=5), DigitsDataModule(seed=6)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])


def test_digits_upsampling_and_raw_pixels() -> None:
    dm = DigitsDataModule(image_size=16, normalize=False, val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    assert dm.split_sizes == (1797 - 180 - 359, 180, 359)
    x = dm.train_set.tensors[0]
    assert x.shape == (1258, 1, 16, 16)
    assert dm.mean is None
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0


def test_digits_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum below 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------- CIFAR


def write_fake_cifar(root: Path, num_classes: int, per_batch: int = 12, num_test: int = 15, seed: int = 0) -> dict:
    """Write a tiny CIFAR-10/100 in torchvision's exact on-disk format; return the arrays written."""
    rng = np.random.default_rng(seed)
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def batch(n: int) -> dict:
        out = {
            "batch_label": "fake",
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, size=n).tolist(),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        if num_classes == 100:
            out["coarse_labels"] = [lbl // 5 for lbl in out["fine_labels"]]
        return out

    def dump(obj: dict, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    written: dict = {"train": [], "test": None}
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            b = batch(per_batch)
            dump(b, folder / f"data_batch_{i}")
            written["train"].append(b)
        written["test"] = batch(num_test)
        dump(written["test"], folder / "test_batch")
        dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        b = batch(5 * per_batch)
        dump(b, folder / "train")
        written["train"].append(b)
        written["test"] = batch(num_test)
        dump(written["test"], folder / "test")
        dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}, folder / "meta")
    return written


def _image(data_row: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data_row.reshape(3, 32, 32).astype(np.float32) / 255.0)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_reads_generated_torchvision_format(tmp_path: Path, num_classes: int) -> None:
    written = write_fake_cifar(tmp_path, num_classes)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    train_data = np.concatenate([b["data"] for b in written["train"]])
    train_labels = sum((b[label_key] for b in written["train"]), [])
    dm = CIFARDataModule(tmp_path, num_classes=num_classes, batch_size=8, num_val=10, seed=1,
                         verify_checksums=False, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [50, 10, 15]
    # the validation split is a seeded permutation of the training files, disjoint from training
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1)).tolist()
    assert list(dm.val_set.indices) == perm[:10]
    assert sorted(dm.val_set.indices + dm.train_set.indices) == list(range(60))
    # validation images: no augmentation, exact normalisation of the written pixels
    mean = torch.tensor(CIFAR_MEAN[num_classes]).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD[num_classes]).view(3, 1, 1)
    idx = perm[0]
    img, label = dm.val_set[0]
    torch.testing.assert_close(img, (_image(train_data[idx]) - mean) / std)
    assert label == train_labels[idx]
    img, label = dm.test_set[3]
    torch.testing.assert_close(img, (_image(written["test"]["data"][3]) - mean) / std)
    assert label == written["test"][label_key][3]
    # loaders
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and y.dtype == torch.long
    assert int(y.max()) < num_classes
    assert sum(b[0].shape[0] for b in dm.val_dataloader()) == 10
    assert sum(b[0].shape[0] for b in dm.test_dataloader()) == 15


def test_cifar_augmentation_crops_and_flips(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, 10, per_batch=4)
    dm = CIFARDataModule(tmp_path, num_val=0, verify_checksums=False, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 15  # num_val=0: validation on the test split
    plain = CIFARDataModule(tmp_path, num_val=0, augment=False, verify_checksums=False, num_workers=0)
    plain.setup("fit")
    torch.manual_seed(0)
    augmented = torch.stack([dm.train_set[0][0] for _ in range(20)])
    assert augmented.shape == (20, 3, 32, 32)
    assert not all(torch.equal(a, plain.train_set[0][0]) for a in augmented)
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


def test_cifar_missing_data_names_directory_and_flag(tmp_path: Path) -> None:
    dm = CIFARDataModule(tmp_path / "nowhere", num_classes=100)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "download=True" in message and "--data.download true" in message
    assert dm.missing_files() == ["train", "test", "meta"]
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")


def test_cifar_checksums_are_verified_by_default(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, 10, per_batch=2)
    dm = CIFARDataModule(tmp_path, num_val=2, num_workers=0)
    dm.prepare_data()  # files are present
    with pytest.raises(RuntimeError, match="verify_checksums=False"):
        dm.setup("fit")


def test_cifar_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes must be 10"):
        CIFARDataModule(num_classes=20)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_val must be in"):
        CIFARDataModule(num_val=50000)
