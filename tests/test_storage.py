"""Storage on a local root: bytes, checksummed blobs, fsynced atomic writes, listing, the
writability probe and redaction (the S3 side runs against moto_server in tests/integration)."""

import json
import os

import pytest

from orchestrator.storage import Storage, StorageError, redact


def test_bytes_round_trip_and_missing_is_none(tmp_path):
    root = Storage.from_uri(tmp_path / "root")
    assert root.read_bytes("a/b.bin") is None
    root.write_bytes("a/b.bin", b"\x00payload")
    assert root.read_bytes("a/b.bin") == b"\x00payload"
    root.write_bytes("a/b.bin", b"new")  # replaced whole, never appended
    assert root.read_bytes("a/b.bin") == b"new"
    assert root.list("a") == ["b.bin"] and root.list("absent") == []
    assert not [p for p in os.listdir(tmp_path / "root" / "a") if "tmp" in p]  # no leftovers
    assert root.child("a").read_bytes("b.bin") == b"new"
    assert root.join("x/y") == f"{root.uri}/x/y"
    root.delete("a/b.bin")
    root.delete("a/b.bin")  # already gone: nothing to do
    assert root.read_bytes("a/b.bin") is None and root.list("a") == []


def test_verified_blobs_reject_corruption_and_missing_manifests(tmp_path):
    root = Storage.from_uri(tmp_path)
    root.put_verified("results/t.json", b'{"a": 1}', {"config": {"depth": "stem"}})
    data, manifest = root.get_verified("results/t.json")
    assert data == b'{"a": 1}' and manifest["config"] == {"depth": "stem"}
    assert manifest["size"] == 8
    (tmp_path / "results" / "t.json").write_bytes(b'{"a": 2}')  # same size, other bytes
    assert root.get_verified("results/t.json") is None
    root.write_bytes("results/u.json", b"orphan")  # a blob whose manifest was never written
    assert root.get_verified("results/u.json") is None
    root.write_bytes("results/v.json", b"x")
    root.write_bytes("results/v.json.json", b"not json")
    assert root.get_verified("results/v.json") is None
    assert json.loads(root.read_bytes("results/t.json.json"))["sha256"]


def test_unwritable_root_is_one_storage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        Storage.from_uri(tmp_path / "file" / "below").check_writable()
    Storage.from_uri(tmp_path / "ok").check_writable()
    assert os.listdir(tmp_path / "ok") == []  # the probe is deleted


def test_redact_hides_credentials_in_uris():
    assert redact("s3://key:secret@host/b and http://u:p@h:5000/x") == \
        "s3://***@host/b and http://***@h:5000/x"
    assert redact("/plain/path") == "/plain/path"


def test_local_writes_are_fsynced_renames_that_leave_no_temporary(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    storage = Storage.from_uri(tmp_path)
    storage.put_verified("trial/state.pt", b"epoch 1", {"epoch": 1})
    storage.put_verified("trial/state.pt", b"epoch 2", {"epoch": 2})
    assert len(synced) == 4  # each blob and each manifest
    data, manifest = storage.get_verified("trial/state.pt")
    assert data == b"epoch 2" and manifest["epoch"] == 2
    assert storage.list("trial") == ["state.pt", "state.pt.json"]
    with pytest.raises(StorageError, match="trial/state.pt/x: cannot write"):
        storage.write_bytes("trial/state.pt/x", b"a file is not a folder")
    assert storage.list("trial") == ["state.pt", "state.pt.json"]
