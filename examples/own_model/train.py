"""Write a dataset of our own as image folders, train ``my_models.SmallNet`` on it with plain
PyTorch and save its state_dict: what a researcher has before using search.py.

    python train.py      # writes data/train/<class>/*.png, data/test/<class>/*.png, net.pt

The images are scikit-learn's 8x8 digits (the only real images available offline), stored as
PNG files the way any image dataset is; the training loop is ordinary user code.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from my_models import make_net

HERE = Path(__file__).parent
DATA = HERE / "data"


def write_folders() -> None:
    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    test = set(order[:360].tolist())  # a fixed 360 as the published test split
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = DATA / ("test" if i in test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")


def read_folder(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, folder in enumerate(sorted((DATA / split).iterdir())):
        for path in sorted(folder.glob("*.png")):
            images.append(np.asarray(Image.open(path), dtype=np.float32) / 255.0)
            labels.append(label)
    return torch.tensor(np.stack(images))[:, None], torch.tensor(labels)


def main() -> None:
    write_folders()
    x, y = read_folder("train")
    mean, std = x.mean().item(), x.std().item()
    print(f"train: {len(y)} images, mean {mean:.4f}, std {std:.4f} (the space's model.mean/std)")
    torch.manual_seed(0)
    net = make_net(num_classes=10)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(8):
        net.train()
        for index in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(net((x[index] - mean) / std), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    x_test, y_test = read_folder("test")
    with torch.no_grad():
        accuracy = (net((x_test - mean) / std).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    torch.save(net.state_dict(), HERE / "net.pt")


if __name__ == "__main__":
    main()
