"""The deployment files: Ray's own validation of the cluster configs, compose, the image."""

import os
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]  # the repository
DOCKER = ROOT / "docker"

pytestmark = pytest.mark.quick  # no service started: seconds


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-local.yaml"])
def test_cluster_config_passes_rays_validation(name):
    config = prepare_config(yaml.safe_load((DOCKER / name).read_text()))
    validate_config(config)  # raises on a schema violation


def test_aws_cluster_gives_every_node_s3_access_and_runs_the_image():
    config = yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    for node_type in config["available_node_types"].values():
        assert "IamInstanceProfile" in node_type["node_config"]
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["docker"]["image"].endswith(":" + version("robust-sweeps"))


def test_dockerfile_uses_the_pinned_ray_gpu_image():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f'"ray[tune]=={ray.__version__}"' in text
    assert "torchvision" not in text.replace("torchvision is not needed", "")


def test_compose_config_is_accepted():
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("REQUIRE_SYSTEM_SERVICES") == "1":
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed")
    env = dict(os.environ, POSTGRES_PASSWORD="p", MINIO_ROOT_USER="u", MINIO_ROOT_PASSWORD="pw")
    done = subprocess.run([compose, "-f", str(DOCKER / "compose.yaml"), "config"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    assert "postgresql://" in str(services["mlflow"]["command"])
