import pytest
import torch

from defenses.data import load_dataset
from defenses.models import build_model
from defenses.training import TrainConfig, Trainer


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
