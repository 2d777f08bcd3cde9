"""A model package that is not part of this project, written by the tests into a temporary
folder (``write_package``): the way a researcher's own code reaches search.py."""

import sys
import textwrap
from pathlib import Path

PACKAGE = "labnets"

_NETS = '''
"""Not a ResNet: nested nn.Sequential stages and a residual addition written in forward."""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return F.relu(x + self.body(x))


class TinyNet(nn.Module):
    def __init__(self, num_classes, width=8, channels=1, size=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()),
            Block(width),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 2) ** 2, 32),
                                  nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def make_net(num_classes, width=8, channels=1, size=8):
    return TinyNet(num_classes, width, channels, size)


class Untraceable(TinyNet):
    """Control flow on the data: torch.fx cannot trace it, so IBP cannot bound it."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


class Squared(TinyNet):
    """A product of two activations: no interval rule."""

    def forward(self, x):
        h = self.features(x)
        return self.head(torch.mul(h, h))


class WrongOutput(TinyNet):
    def forward(self, x):
        return super().forward(x)[:, :3]


def untraceable(num_classes):
    return Untraceable(num_classes)


def squared(num_classes):
    return Squared(num_classes)


def wrong_output(num_classes):
    return WrongOutput(num_classes)


def not_a_module(num_classes):
    return "a string"
'''


def write_package(folder: Path) -> Path:
    """``folder/labnets/{__init__,nets}.py``; returns ``folder`` (put it on the path)."""
    package = Path(folder) / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(_NETS))
    return Path(folder)


def import_package(folder: Path):
    """Write the package and make it importable in this process (drops an older copy)."""
    write_package(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    import importlib

    return importlib.import_module(f"{PACKAGE}.nets")
