"""Atomic writes and npz blobs: round trips, and one error type naming what was read."""

import numpy as np
import pytest

from defenses._io import BlobError, atomic_write_bytes, npz_bytes, read_file_bytes, read_npz


def test_npz_round_trip_keeps_arrays_and_drops_the_tag():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "name": np.array("stem")}
    back = read_npz(npz_bytes("demo/1", arrays), "demo/1", "the demo blob")
    assert set(back) == {"a", "name"}
    assert np.array_equal(back["a"], arrays["a"]) and back["a"].dtype == np.float32
    assert str(back["name"]) == "stem"


@pytest.mark.parametrize("data", [
    b"junk",
    npz_bytes("demo/1", {"a": np.zeros(3)})[:40],  # truncated
    npz_bytes("other/2", {"a": np.zeros(3)}),  # another format
    np.zeros(3).tobytes(),
])
def test_a_corrupt_or_foreign_blob_is_one_error_naming_what(data):
    with pytest.raises(BlobError, match=r"^the demo blob: not a demo/1 blob \(") as info:
        read_npz(data, "demo/1", "the demo blob")
    assert isinstance(info.value, ValueError)


def test_a_pickled_blob_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", format=np.array("demo/1"), a=np.array([object()]))
    with pytest.raises(BlobError, match="obj.npz: not a demo/1 blob"):
        read_npz((tmp_path / "obj.npz").read_bytes(), "demo/1", "obj.npz")


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "blob.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert read_file_bytes(path, "blob") == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]
    with pytest.raises(BlobError, match="missing.bin: no such blob file"):
        read_file_bytes(tmp_path / "missing.bin", "blob")
