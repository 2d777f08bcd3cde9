"""A researcher's own data: ``folder`` (class-per-folder images, ``root/train/<class>/*`` and
``root/test/<class>/*``, decoded on access) and ``arrays`` (an ``.npz`` archive with
``x_train``, ``y_train``, ``x_test`` and ``y_test``).

``_load_folder`` and ``_load_arrays`` return the dataset's ``Splits``; what each accepts is
documented in ``defenses.data.load_dataset``, which imports them when such a dataset is loaded.
``STATS_SAMPLE`` stays importable from ``defenses.data``.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from defenses.datasets import (ArrayDataset, DatasetError, DeferredDataset, ImageFolderDataset,
                               Splits, _one_line, carve_validation, default_val_size)

__all__ = ["STATS_SAMPLE"]

# Pillow modes of one grey channel (a folder's default channel count: 1 for these, else 3)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N"})


# ----------------------------------------------------------------------------------------------
# folder: a researcher's images, root/train/<class>/* and root/test/<class>/*

# How many training images the mean and std of a folder are estimated from (seeded draw).
STATS_SAMPLE = 1000

# Never a class folder or an image: hidden names (.DS_Store, ._x.png, .ipynb_checkpoints) and
# what Windows and macOS archives leave behind.
_JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})


def _junk(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _entries(folder: Path, folders: bool, wrong: str, empty: str) -> list[Path]:
    """The non-hidden entries of ``folder``, sorted: all folders (``folders``) or all regular
    files; ``DatasetError`` naming an entry of the other kind (``wrong``) or an empty folder
    (``empty``)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _junk(entry.name):
                continue
            if not (entry.is_dir() if folders else entry.is_file()):
                raise DatasetError(f"{entry.path}: {wrong}")
            found.append(Path(entry.path))
    if not found:
        raise DatasetError(f"{folder}: {empty}")
    return sorted(found)


def _class_folders(split: Path) -> list[str]:
    """The class folders of ``split`` (train/ or test/), sorted by name."""
    if not split.is_dir():
        raise DatasetError(f"{split}: missing, expected one folder per class "
                           f"({split.name}/<class>/<image files>)")
    layout = f"{split.name}/<class>/<image files>"
    return [path.name for path in _entries(
        split, True, f"not a folder, expected only class folders in {split.name}/ ({layout})",
        f"no class folders, expected {layout}")]


def _image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted: every regular file not hidden, not read."""
    return _entries(folder, False, "not a regular file, expected only image files in a class "
                    "folder (no subfolders)",
                    "no images, expected at least one image file in each class folder")


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

