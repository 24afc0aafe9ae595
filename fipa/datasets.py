"""Image-classification data sets as in-memory tensors, and the paper's CIFAR augmentation (FIPA_SPEC 5.3).

``load_dataset(name, root, train)`` returns ``(images, labels)``: float32 ``N x C x H x W`` scaled to [0, 1]
and then normalized with the data set's per-channel mean/std (``MEAN_STD``), and int64 ``N`` labels.

Where the files come from:
- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/*.gz``)
  if installed, else ``<root>/FashionMNIST/raw`` (torchvision's layout), downloaded by torchvision if missing.
- ``mnist``: ``<root>/MNIST/raw`` (idx files, plain or ``.gz``), downloaded by torchvision if missing.
- ``cifar10`` / ``cifar100``: ``<root>/cifar-10-batches-py`` / ``<root>/cifar-100-python`` (the extracted
  python-pickle archives), downloaded and extracted by torchvision if missing. Files that are present are
  read directly by this module (torchvision verifies the md5 sums when it downloads; it is only used for that).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16): the first 1500 are the training
  split, the remaining 297 the test split (deterministic; both splits hold every class about equally often).

``root`` defaults to ``~/.cache/fipa/data``. When a download is needed and fails (no network), a
``ConfigError`` says which directory to fill and where to get the files.

Decoded uint8 arrays are cached per process (``functools.lru_cache``); every call returns fresh float tensors,
so callers may modify them in place.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fipa.errors import ConfigError, require

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_ROOT",
    "MEAN_STD",
    "NUM_CLASSES",
    "black_fill",
    "cifar_augment",
    "load_dataset",
    "read_idx",
]

DEFAULT_ROOT = Path("~/.cache/fipa/data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `dpkg -L dataset-fashion-mnist`

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "digits")
NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}
# Per-channel mean / std of the training images scaled to [0, 1].
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3051,), (0.3750,)),  # of the 1500 training images, values / 16
}
_SCALE = {"digits": 16.0}  # raw maximum; 255 for the others

DIGITS_TRAIN = 1500

# ----------------------------------------------------------------------------------------------- public API


def load_dataset(name: str, root: str | Path | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """``(images float32 N x C x H x W, normalized; labels int64 N)`` for one split of a named data set."""
    require(
        isinstance(name, str) and name in DATASETS,
        f"task.dataset must be one of {', '.join(DATASETS)}; got {name!r}",
    )
    root_key = (
        None if name == "digits" else str(Path(root if root is not None else DEFAULT_ROOT).expanduser().absolute())
    )
    raw, labels = _decoded(name, root_key, bool(train))
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in MEAN_STD[name])
    images = torch.from_numpy(raw).to(torch.float32).div_(_SCALE.get(name, 255.0)).sub_(mean).div_(std)
    return images, torch.from_numpy(labels.copy())


def black_fill(name: str) -> tuple[float, ...]:
    """The normalized value of a black pixel, per channel: pass as ``cifar_augment(..., fill=black_fill("cifar10"))``
    to pad exactly like RandomCrop on raw images (which the paper's pipeline does before normalizing)."""
    require(name in MEAN_STD, f"unknown data set {name!r}; one of {', '.join(DATASETS)}")
    mean, std = MEAN_STD[name]
    return tuple(-m / s for m, s in zip(mean, std))


def cifar_augment(
    batch: Tensor,
    generator: torch.Generator | None,
    padding: int = 4,
    fill: float | Sequence[float] = 0.0,
) -> Tensor:
    """Random crop with zero padding (default 4) plus random horizontal flip (p = 0.5), per sample.

    The same as applying ``torchvision.transforms.v2.RandomCrop(size, padding=padding, fill=fill)`` and then
    ``RandomHorizontalFlip()`` to every image separately, but vectorized: the batch is padded once
    (``v2.functional.pad``) and every sample's crop window, mirrored when flipped, is gathered with one
    indexing operation. The offsets (each uniform in 0..2*padding) and flips come from ``generator`` (a CPU
    ``torch.Generator``, e.g. ``fipa.seeding.torch_generator(seed, SHUFFLE, ...)``; None uses torch's global
    RNG), so equal generator states give equal outputs. ``fill`` is in the units of ``batch``: 0 is the mean
    colour of normalized images; ``black_fill(name)`` gives black. Returns a new tensor of ``batch``'s shape.
    """
    require(batch.ndim == 4, f"cifar_augment expects an N x C x H x W batch, got shape {tuple(batch.shape)}")
    n = batch.shape[0]
    tops, lefts, flips = _augment_params(n, padding, generator)
    return _crop_flip(batch, tops, lefts, flips, padding, fill)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, into a numpy array."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    dtypes = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[data[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{path} is truncated or corrupted: header says {dims}, file has {len(data)} bytes")
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------------------------- augmentation


def _augment_params(n: int, padding: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    require(isinstance(padding, int) and padding >= 0, f"padding must be an integer >= 0, got {padding!r}")
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets[:, 0], offsets[:, 1], flips


def _crop_flip(
    batch: Tensor, tops: Tensor, lefts: Tensor, flips: Tensor, padding: int, fill: float | Sequence[float]
) -> Tensor:
    from torchvision.transforms.v2 import functional as TF

    n, c, h, w = batch.shape
    fill = [float(v) for v in fill] if isinstance(fill, Sequence) else float(fill)
    padded = TF.pad(batch, [padding] * 4, fill=fill) if padding else batch
    device = batch.device
    tops, lefts, flips = tops.to(device), lefts.to(device), flips.to(device)
    rows = tops[:, None] + torch.arange(h, device=device)  # n x h
    cols_in = torch.arange(w, device=device)
    cols = lefts[:, None] + torch.where(flips[:, None], w - 1 - cols_in, cols_in)  # n x w, mirrored if flipped
    samples = torch.arange(n, device=device)[:, None, None, None]
    channels = torch.arange(c, device=device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------------------------- loading


@functools.cache
def _decoded(name: str, root: str | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x C x H x W, int64 N), decoded once per process; only ever handed out as copies."""
    images, labels = _LOADERS[name](Path(root) if root is not None else None, train)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ConfigError(f"{name}: {len(images)} images but {len(labels)} labels; the files are inconsistent")
    return images, labels


def _load_digits(root: Path | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # values 0..16
    part = slice(None, DIGITS_TRAIN) if train else slice(DIGITS_TRAIN, None)
    return images[part], digits.target[part]


_IDX_STEMS = {True: "train", False: "t10k"}
_MNIST_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def _find(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_dir(directory: Path, train: bool) -> tuple[np.ndarray, np.ndarray] | None:
    stem = _IDX_STEMS[train]
    images = _find(directory, f"{stem}-images-idx3-ubyte")
    labels = _find(directory, f"{stem}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    try:
        return read_idx(images)[:, None], read_idx(labels)
    except (OSError, ValueError, EOFError) as error:
        raise ConfigError(f"cannot read {directory}: {error}; delete the broken file and download it again") from error


def _mnist_family(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    cls_name = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
    raw = root / cls_name / "raw"  # where torchvision keeps (and downloads) the idx files
    candidates = ([DEBIAN_FASHION_MNIST] if name == "fashion_mnist" else []) + [raw]
    for directory in candidates:
        found = _read_mnist_dir(directory, train)
        if found is not None:
            return found
    files = ", ".join(f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))
    debian = "or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), " if name == "fashion_mnist" else ""

    def fetch():
        import torchvision

        getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)

    _download(
        fetch,
        f"{name} is not available offline: put {files} (from {_MNIST_URLS[name]}) into {raw}/, {debian}"
        f"or run `python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', download=True)\"` "
        f"on a machine with internet and copy {root / cls_name} here",
    )
    found = _read_mnist_dir(raw, train)
    if found is None:
        raise ConfigError(f"{name}: torchvision's download finished but {raw} lacks the {_IDX_STEMS[train]} files")
    return found


_CIFAR = {
    # name: (torchvision class, folder inside root, train files, test files, label key, archive URL)
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def write_synthetic_cifar(
    root: str | Path, name: str = "cifar10", per_file: int = 3, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Random CIFAR-shaped images and labels in torchvision's extracted-archive layout under `root`, for checks of
    the hardware and the pipeline where the real files are absent (scripts/gpu_check.py, tests); never for results.
    Returns each file's (uint8 N x 3072 rows, labels)."""
    _, folder, train_files, test_files, key, _ = _CIFAR[name]
    num_classes = NUM_CLASSES[name]
    rng = np.random.default_rng(seed)
    directory = Path(root) / folder
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for f in [*train_files, *test_files]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        entry = {"batch_label": f, key: labels, "data": data, "filenames": [f"{i}.png" for i in range(per_file)]}
        if name == "cifar100":
            entry["coarse_labels"] = [v // 5 for v in labels]
        with open(directory / f, "wb") as handle:
            pickle.dump(entry, handle)
        written[f] = (data, labels)
    with open(directory / ("batches.meta" if name == "cifar10" else "meta"), "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(num_classes)]}, handle)
    return written


def _read_cifar_dir(directory: Path, files: list[str], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not all((directory / f).is_file() for f in files):
        return None
    images, labels = [], []
    for f in files:
        try:
            with open(directory / f, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[key], dtype=np.int64))
        except Exception as error:  # truncated, not a pickle, wrong keys or shapes
            raise ConfigError(
                f"cannot read {directory / f} ({type(error).__name__}: {error}); delete {directory} and download it again"
            ) from error
    return np.concatenate(images), np.concatenate(labels)


def _cifar(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    cls_name, folder, train_files, test_files, key, url = _CIFAR[name]
    directory, files = root / folder, train_files if train else test_files
    found = _read_cifar_dir(directory, files, key)
    if found is not None:
        return found

    def fetch():
        import torchvision

        getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)  # checks the md5 sums

    archive = url.rsplit("/", 1)[1]
    _download(
        fetch,
        f"{name} is not available offline: expected {', '.join(files)} in {directory}/. Download {url} "
        f"and extract it into {root} (`tar -xzf {archive} -C {root}` creates {folder}/), or run "
        f"`python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', download=True)\"` "
        f"on a machine with internet and copy {directory} here",
    )
    found = _read_cifar_dir(directory, files, key)
    if found is None:
        raise ConfigError(f"{name}: torchvision's download finished but {directory} lacks {', '.join(files)}")
    return found


def _download(fetch, message: str) -> None:
    try:
        fetch()
    except Exception as error:  # URLError, RuntimeError (torchvision's "Error downloading"), OSError, ...
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(f"{message} (download failed: {type(error).__name__}: {reason})") from error


_LOADERS = {
    "fashion_mnist": lambda root, train: _mnist_family("fashion_mnist", root, train),
    "mnist": lambda root, train: _mnist_family("mnist", root, train),
    "cifar10": lambda root, train: _cifar("cifar10", root, train),
    "cifar100": lambda root, train: _cifar("cifar100", root, train),
    "digits": _load_digits,
}
