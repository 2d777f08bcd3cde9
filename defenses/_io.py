"""Files and blobs: atomic writes (a reader never sees a half-written file) and ``.npz`` blobs of
plain arrays (no pickle), each read back with one error type, ``BlobError``."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["BlobError", "atomic_write_bytes", "read_file_bytes", "npz_bytes", "read_npz"]


class BlobError(ValueError):
    """A stored file or blob is missing, unreadable, or not of the expected format."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    The temporary name is unique per call, so concurrent writers of one path (threads or
    processes) never share it; the last rename wins and each rename installs a whole file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_file_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of the file at ``path``; ``BlobError`` naming ``what`` if there is none."""
    path = Path(path)
    if not path.is_file():
        raise BlobError(f"{path}: no such {what} file")
    return path.read_bytes()


def npz_bytes(file_format: str, arrays: Mapping[str, np.ndarray]) -> bytes:
    """``.npz`` bytes of ``arrays`` (plain arrays, no pickle) tagged ``format=file_format``."""
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array(file_format), **arrays)
    return buffer.getvalue()


def read_npz(data: bytes, file_format: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of ``npz_bytes(file_format, ...)`` (without ``format``), read eagerly.

    Raises:
        BlobError: ``"{what}: not a {file_format} blob (reason)"`` when ``data`` is not an npz,
            needs pickle, or carries another format tag.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        found = str(arrays.pop("format", "no format tag"))
        if found != file_format:
            raise ValueError(f"format {found!r}")
    except Exception as exc:
        raise BlobError(f"{what}: not a {file_format} blob ({exc})") from exc
    return arrays
