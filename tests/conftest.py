import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from defenses.data import load_dataset
from defenses.models import build_model
from defenses.trainer import TrainConfig, Trainer


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing",
                          aws_secret_access_key="testing-secret-key")
        s3.create_bucket(Bucket="sweeps")
        yield env, s3, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
