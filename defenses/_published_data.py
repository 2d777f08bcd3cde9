"""The loaders of published formats, read from the folder the user mounts: MNIST's IDX files,
CIFAR-10's python pickle batches and Tiny ImageNet's folder of JPEGs.

Each ``_load_<name>(root, val, seed)`` returns the dataset's ``Splits``: the validation split
carved from the published training data, the published test split read on its first use
(``DeferredDataset``). ``defenses.data.load_dataset`` imports them when such a dataset is
loaded; ``read_idx`` stays importable from ``defenses.data``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from defenses.datasets import (DEFAULT_VAL, INPUT_SHAPES, ArrayDataset, DatasetError,
                               DeferredDataset, ImageFolderDataset, Splits, _array_splits,
                               carve_validation)

__all__ = ["read_idx"]


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

