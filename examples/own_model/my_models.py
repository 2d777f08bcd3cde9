"""A classifier of our own, as a researcher would write it: not a ResNet, nested
``nn.Sequential`` stages and a residual addition written in ``forward``. It expects inputs
normalised with the training set's mean and std (the space gives them)."""

import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return F.relu(x + self.body(x))


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            Residual(width),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
            Residual(2 * width),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def make_net(num_classes: int, width: int = 16) -> nn.Module:
    return SmallNet(num_classes, width)
