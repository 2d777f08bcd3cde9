"""The sweep's storage: a local folder or an ``s3://`` prefix, through pyarrow's filesystems.

S3-compatible servers (MinIO, moto) are reached with the standard ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) variable; credentials come from the usual AWS chain. Writes are atomic
(locally ``defenses._io.atomic_write_bytes``: a temp file, fsynced, renamed into place; an S3 PUT
is atomic by nature) and every blob is stored with its SHA-256, checked when read back, so a
half-written file is never taken for a whole one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from defenses._io import atomic_write_bytes

__all__ = ["Storage", "StorageError", "redact"]


class StorageError(RuntimeError):
    """The storage is unreachable, unwritable, or a blob failed its checksum."""


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it replaced by ``***@`` (for
    logs, errors and MLflow)."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    """One S3 client per endpoint and region in a process (building one sets up the AWS SDK
    and resolves credentials: too slow to do for every read and write)."""
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Storage:
    """A root (local absolute path or ``s3://bucket/prefix``) and paths below it."""

    uri: str

    @classmethod
    def from_uri(cls, uri: str | Path) -> "Storage":
        text = str(uri)
        if "://" not in text:
            text = str(Path(text).expanduser().resolve())
        return cls(text.rstrip("/"))

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def _fs_and_root(self) -> tuple[pafs.FileSystem, str]:
        if self.is_s3:
            region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
            return _s3(_endpoint(), region), self.uri[len("s3://"):]
        return pafs.LocalFileSystem(), self.uri

    def child(self, *parts: str) -> "Storage":
        return Storage("/".join([self.uri, *parts]))

    def join(self, relative: str) -> str:
        return f"{self.uri}/{relative}"

    # -- bytes -----------------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes) -> None:
        fs, root = self._fs_and_root()
        path = f"{root}/{relative}"
        try:
            if self.is_s3:
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                with fs.open_output_stream(path) as out:
                    out.write(data)
            else:  # a temporary file, fsynced, renamed into place
                atomic_write_bytes(path, data)
        except OSError as exc:
            raise StorageError(f"{redact(self.uri)}/{relative}: cannot write ({exc})") from exc

    def read_bytes(self, relative: str) -> bytes | None:
        """The blob's bytes, or None if it does not exist."""
        fs, root = self._fs_and_root()
        path = f"{root}/{relative}"
        try:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except OSError as exc:
            raise StorageError(f"{redact(self.uri)}/{relative}: cannot read ({exc})") from exc

    def list(self, relative: str) -> list[str]:
        """Names (not paths) of what lies directly below ``relative``; [] if nothing."""
        fs, root = self._fs_and_root()
        try:
            folder = f"{root}/{relative}" if relative else root
            infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"{redact(self.uri)}/{relative}: unreachable ({exc})") from exc
        return sorted(info.base_name for info in infos)

    def delete(self, relative: str) -> None:
        """Delete a blob (nothing if it does not exist)."""
        fs, root = self._fs_and_root()
        path = f"{root}/{relative}"
        try:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_file(path)
        except OSError as exc:
            raise StorageError(f"{redact(self.uri)}/{relative}: cannot delete ({exc})") from exc

    def check_writable(self) -> None:
        """Write and delete a probe, raising one clear ``StorageError`` if that fails."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"ok")
        fs, root = self._fs_and_root()
        try:
            fs.delete_file(f"{root}/{probe}")
        except OSError as exc:
            raise StorageError(f"{redact(self.uri)}: cannot delete ({exc})") from exc

    # -- checksummed blobs -----------------------------------------------------------------

    def put_verified(self, relative: str, data: bytes, meta: dict[str, Any]) -> None:
        """Write ``data`` then its manifest (sha256 + meta): a blob without a manifest, or one
        that does not match it, does not count as written."""
        self.write_bytes(relative, data)
        manifest = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **meta}
        self.write_bytes(relative + ".json", json.dumps(manifest, sort_keys=True).encode())

    def get_verified(self, relative: str) -> tuple[bytes, dict[str, Any]] | None:
        """(data, manifest) if both exist and the checksum matches, else None."""
        raw_manifest = self.read_bytes(relative + ".json")
        if raw_manifest is None:
            return None
        try:
            manifest = json.loads(raw_manifest)
        except ValueError:
            return None
        data = self.read_bytes(relative)
        if data is None or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            return None
        return data, manifest
