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


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-local.yaml"])
def test_every_node_of_a_cluster_runs_with_token_authentication(name):
    config = yaml.safe_load((DOCKER / name).read_text())
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    # the driver, started by ray submit in a login shell, too
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c
               for c in config["setup_commands"])


def test_compose_config_is_accepted_publishes_only_mlflow_and_needs_every_secret(tmp_path):
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("REQUIRE_SYSTEM_SERVICES") == "1":
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed")
    secrets = {"POSTGRES_PASSWORD": "p", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "pw",
               "MLFLOW_ADMIN_PASSWORD": "a-long-admin-password",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    bare = {k: v for k, v in os.environ.items() if k not in secrets}

    empty = tmp_path / "empty.env"  # not docker/.env, which a server's admin keeps there
    empty.write_text("")

    def config(env):
        return subprocess.run([compose, "--env-file", str(empty), "-f",
                               str(DOCKER / "compose.yaml"), "config"],
                              capture_output=True, text=True, env=env, cwd=DOCKER)

    done = config(dict(bare, **secrets))
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    assert "postgresql://" in str(mlflow["command"])
    assert "--app-name basic-auth" in str(mlflow["command"])
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/config/mlflow-auth.ini"
    # only MLflow is published, and on the loopback interface (the site's proxy fronts it)
    published = {name: service.get("ports", []) for name, service in services.items()
                 if service.get("ports")}
    assert list(published) == ["mlflow"]
    (port,) = published["mlflow"]
    if isinstance(port, str):  # docker-compose 1's short form, "127.0.0.1:5000:5000/tcp"
        port = dict(zip(("host_ip", "published", "target"), port.split("/")[0].split(":")))
    assert (port.get("host_ip"), str(port.get("published")), str(port.get("target"))) == (
        "127.0.0.1", "5000", "5000")
    # without any one secret the stack does not start
    for missing in secrets:
        refused = config(dict(bare, **{k: v for k, v in secrets.items() if k != missing}))
        assert refused.returncode != 0 and missing in refused.stderr, missing
