"""Data set loaders (offline: fake files in torchvision's layouts, the Debian package, sklearn) and augmentation."""

from __future__ import annotations

import gzip
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fipa import datasets
from fipa.datasets import MEAN_STD, black_fill, cifar_augment, load_dataset, read_idx
from fipa.errors import ConfigError
from fipa.seeding import SHUFFLE, torch_generator


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: every urllib request fails at once, like on a machine without internet."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def normalized(raw: np.ndarray, name: str, scale: float = 255.0) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in MEAN_STD[name])
    return (torch.from_numpy(raw).float() / scale - mean) / std


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_dtypes_and_split():
    x, y = load_dataset("digits")
    xt, yt = load_dataset("digits", train=False)
    assert x.shape == (1500, 1, 8, 8) and xt.shape == (297, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (1500,)
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3  # normalized by the train stats

    from sklearn.datasets import load_digits

    raw = load_digits()
    assert torch.allclose(x, normalized(raw.images[:1500, None], "digits", 16.0), atol=1e-6)
    assert torch.equal(yt, torch.from_numpy(raw.target[1500:]))


def test_returned_tensors_are_fresh_copies():
    x, y = load_dataset("digits")
    x.zero_()
    y.fill_(-1)
    x2, y2 = load_dataset("digits")
    assert x2.abs().sum() > 0 and y2.min() == 0


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="fashion_mnist, mnist, cifar10, cifar100, digits"):
        load_dataset("svhn")


# ------------------------------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, name: str, per_file: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny files in torchvision's extracted-archive layout (pickled dicts of N x 3072 uint8 rows)."""
    from fipa.datasets import write_synthetic_cifar

    return write_synthetic_cifar(root, name, per_file, seed)


def test_cifar10_reads_torchvision_layout(tmp_path):
    written = write_cifar(tmp_path, "cifar10")
    x, y = load_dataset("cifar10", root=tmp_path)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    raw = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    assert torch.allclose(x, normalized(raw, "cifar10"), atol=1e-6)
    assert y.tolist() == sum((labels for _, labels in train), [])

    xt, yt = load_dataset("cifar10", root=str(tmp_path), train=False)
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    # channel order is R, G, B planes of 1024 values each, as in the archive
    assert torch.allclose(xt[0, 1].flatten(), normalized(written["test_batch"][0][:1].reshape(1, 3, 32, 32), "cifar10")[0, 1].flatten())


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar(tmp_path, "cifar100", per_file=4)
    x, y = load_dataset("cifar100", root=tmp_path)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == written["train"][1]


@pytest.mark.parametrize(
    "name, folder",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw")],
)
def test_missing_dataset_says_where_to_put_it(tmp_path, name, folder):
    with pytest.raises(ConfigError) as info:
        load_dataset(name, root=tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / folder) in message
    assert "download failed" in message and "network disabled in tests" in message
    assert "http" in message  # where to get the files


def test_corrupted_cifar_file_is_a_config_error(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path, train=False)


# ------------------------------------------------------------------------------------- (Fashion-)MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_falls_back_to_torchvision_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    x, y = load_dataset("fashion_mnist", root=tmp_path, train=False)
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [3, 1, 4, 1, 5]
    assert torch.allclose(x, normalized(images[:, None], "fashion_mnist"), atol=1e-6)
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):  # train split missing, no network
        load_dataset("fashion_mnist", root=tmp_path, train=True)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok.gz", np.arange(6).reshape(2, 3))
    assert read_idx(tmp_path / "ok.gz").tolist() == [[0, 1, 2], [3, 4, 5]]


DEBIAN_TEST_IMAGES = datasets.DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"


@pytest.mark.skipif(not DEBIAN_TEST_IMAGES.exists(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    x, y = load_dataset("fashion_mnist", root=tmp_path / "unused", train=False)  # no download, nothing written
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert not (tmp_path / "unused").exists()


# ------------------------------------------------------------------------------------------ augmentation


def reference_augment(batch, tops, lefts, flips, padding=4, fill=0.0):
    """Per-sample torchvision.transforms.v2: pad, crop, flip; what RandomCrop + RandomHorizontalFlip do."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for image, top, left, flip in zip(batch, tops.tolist(), lefts.tolist(), flips.tolist()):
        image = TF.pad(image, [padding] * 4, fill=fill)
        image = TF.crop(image, top, left, batch.shape[2], batch.shape[3])
        out.append(TF.horizontal_flip(image) if flip else image)
    return torch.stack(out)


def test_cifar_augment_matches_per_sample_torchvision():
    batch = torch.randn(64, 3, 32, 32)
    for fill in (0.0, black_fill("cifar10")):
        tops, lefts, flips = datasets._augment_params(64, 4, torch_generator(0, SHUFFLE))
        expected = reference_augment(batch, tops, lefts, flips, fill=list(fill) if isinstance(fill, tuple) else fill)
        assert torch.equal(cifar_augment(batch, torch_generator(0, SHUFFLE), fill=fill), expected)


def test_cifar_augment_shape_seeding_and_randomness():
    batch = torch.randn(256, 3, 32, 32)
    a = cifar_augment(batch, torch_generator(1, SHUFFLE))
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert torch.equal(a, cifar_augment(batch, torch_generator(1, SHUFFLE)))
    assert not torch.equal(a, cifar_augment(batch, torch_generator(2, SHUFFLE)))
    tops, lefts, flips = datasets._augment_params(4000, 4, torch_generator(3, SHUFFLE))
    assert set(tops.tolist()) == set(lefts.tolist()) == set(range(9))  # offsets -4..4 all occur
    assert 0.45 < flips.float().mean().item() < 0.55


def test_cifar_augment_moves_a_bright_pixel_at_most_4px():
    n, row, col = 500, 13, 10
    batch = torch.zeros(n, 3, 32, 32)
    batch[:, :, row, col] = 1.0
    out = cifar_augment(batch, torch_generator(4, SHUFFLE))
    assert torch.equal(out.sum(dim=(2, 3)), torch.ones(n, 3))  # the pixel always stays inside the crop
    where = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = where // 32, where % 32
    assert (rows - row).abs().max() <= 4
    unflipped = (cols - col).abs() <= 4
    flipped = (cols - (31 - col)).abs() <= 4
    assert torch.all(unflipped | flipped)
    assert unflipped.any() and flipped.any()  # both flips happen
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 50  # and many different shifts


def test_black_fill_pads_with_black():
    x = normalized(np.full((1, 3, 32, 32), 255, np.uint8), "cifar10")  # a white image
    params = (torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))  # shift down-right by 4
    out = datasets._crop_flip(x, *params, padding=4, fill=black_fill("cifar10"))
    black = normalized(np.zeros((1, 3, 1, 1), np.uint8), "cifar10")[0, :, 0, 0]
    assert torch.allclose(out[0, :, 0, 0], black) and torch.allclose(out[0, :, 31, 31], x[0, :, 27, 27])
