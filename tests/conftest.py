"""Fixtures and file writers shared by the unit tests (the integration tests' helpers are in
tests/integration/conftest.py), and the ``--long`` option: without it, the tests marked
``long`` (the real-service integration tests that take minutes: a cluster over SSH, crash
windows, outages, every shipped space's sweep) are deselected, so ``python -m pytest`` is the
edit-test loop; CI passes ``--long``."""

import gzip
import struct

import numpy as np
import pytest
import torch

from defenses.data import load_dataset
from defenses.models import build_model
from defenses.trainer import TrainConfig, Trainer


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked long (real services, minutes each; CI "
                          "runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    long = [item for item in items if item.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if not item.get_closest_marker("long")]


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_resnet(digits):
    """The small ResNet trained on digits (about 5 s on two CPU cores)."""
    torch.manual_seed(0)
    model = build_model("resnet_digits", digits.num_classes, digits.input_shape, digits.mean,
                        digits.std)
    trainer = Trainer(model, digits.train, TrainConfig(epochs=15, batch_size=64, lr=3e-3))
    trainer.fit()
    return model.eval()


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_mnist(root, n_train=40, n_test=10, gz=False, rng=np.random.default_rng(0)):
    """The four IDX files; every class in turn (0..9, 0..9, ...), so splits can stratify."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}",
                  (np.arange(n) % 10).astype(np.uint8), gz)
    return root
