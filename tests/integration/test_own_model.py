"""A researcher's own model and data, end to end through the real CLI (local Ray, MLflow's
SQLite store): a package that is not this project's (``tests/own_package.py``: nested
``nn.Sequential`` stages, a residual addition in ``forward``), its weights saved the way other
code saves them, images in class folders and arrays in an .npz; and the worked example of
docs/own-model.md (``examples/own_model``) run as it says."""

import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.integration.conftest import (ROOT, check_tracked, cli, computed_stages,
                                        read_csv_artifact, run_ok, sweep_args)
from tests.own_package import import_package
from orchestrator.storage import Storage

FACTORY = "labnets.nets:make_net"


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A folder with the package, a trained TinyNet's weights (DataParallel-style keys under
    "state_dict", as many training scripts save them), the digits as PNG class folders and as
    an NHWC uint8 .npz."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("own")
    nets = import_package(folder)
    images, labels = _digits()
    test = np.zeros(len(labels), dtype=bool)
    test[np.random.default_rng(0).permutation(len(labels))[:300]] = True
    for i, (image, label) in enumerate(zip(images, labels)):
        out = folder / "images" / ("test" if test[i] else "train") / f"digit{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().astype(np.uint8), mode="L").save(out / f"{i}.png")
    pixels = (images * 255).round().astype(np.uint8)[..., None]  # NHWC
    np.savez(folder / "digits.npz", x_train=pixels[~test], y_train=labels[~test],
             x_test=pixels[test], y_test=labels[test])
    torch.manual_seed(0)
    net = nets.make_net(10)
    x, y = torch.from_numpy(images[~test])[:, None], torch.from_numpy(labels[~test])
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(6):
        for index in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(net(x[index]), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "epoch": 6}, folder / "net.pt")
    return folder


def _run(own, tmp_path, space: str, name: str):
    for item in ("labnets", "images", "digits.npz", "net.pt"):
        (tmp_path / item).symlink_to(own / item)
    args, uri = sweep_args(tmp_path, textwrap.dedent(space), name)
    return run_ok(args, tmp_path), uri


def test_lesci_at_two_nested_module_paths_of_an_own_model_from_its_checkpoint(own, tmp_path):
    _, uri = _run(own, tmp_path, f"""
        name: own-lesci
        family: lesci
        dataset: {{name: folder, root: images}}
        model: {{factory: '{FACTORY}', checkpoint: net.pt}}
        training: {{epochs: 1, lr: 1.0e-7}}  # unused: the checkpoint is the base model
        params:
          depth: {{grid: [features.1.body.2, features.2.1]}}
          n_components: 8
          k: [3]
        attack: {{eps: 0.1, steps: 3, apgd: {{steps: 3, targets: 0}}, samples: 40}}
        optimize: {{accuracy: max, projection_rate: max}}
        search: {{algorithm: grid, max_concurrent: 2}}
    """, "o")
    client, parent, children = check_tracked(uri, "o", "lesci", 2)
    assert {c.data.params["depth"] for c in children} == {"features.1.body.2", "features.2.1"}
    # the checkpoint's model: a model trained as the space says would be at chance
    assert parent.data.metrics["base_accuracy"] > 0.9
    stages = computed_stages(Storage.from_uri(tmp_path / "sweeps" / "o"))
    assert stages["base"] == 1 and stages["pca"] == 2
    rows = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert all(float(r["accuracy"]) > 0.8 for r in rows)
    assert parent.data.params["model"] == FACTORY


def test_adversarial_fine_tuning_starts_from_the_checkpoint(own, tmp_path):
    # a learning rate too small to learn anything in one epoch: only the checkpoint's weights
    # can be this accurate (from scratch: chance, about 0.1)
    _, uri = _run(own, tmp_path, f"""
        name: own-adv
        family: adversarial
        dataset: {{name: arrays, path: digits.npz}}
        model: {{factory: '{FACTORY}', checkpoint: net.pt}}
        training: {{epochs: 1, lr: 1.0e-7}}
        params: {{eps: 0.05, objective: fgsm}}
        attack: {{eps: 0.05, steps: 3, suite: {{apgd_steps: 3, square_queries: 0}}}}
        optimize: {{nominal_accuracy: max, robust_accuracy: max}}
        search: {{algorithm: grid, max_concurrent: 1}}
    """, "a")
    _, parent, children = check_tracked(uri, "a", "adversarial", 1)
    metrics = children[0].data.metrics
    assert metrics["nominal_accuracy"] > 0.9 and metrics["test_nominal_accuracy"] > 0.9
    assert metrics["robust_accuracy"] <= metrics["nominal_accuracy"]


def test_ibp_sweep_on_an_own_traceable_model(own, tmp_path):
    _, uri = _run(own, tmp_path, f"""
        name: own-ibp
        family: ibp
        dataset: {{name: arrays, path: digits.npz}}
        model: {{factory: '{FACTORY}', options: {{width: 4}}}}
        training: {{epochs: 2, batch_size: 128, lr: 0.003}}
        params: {{eps_train: 0.05, warmup: 0, rampup: 10}}
        attack: {{eps: 0.05, steps: 3, suite: {{apgd_steps: 3, square_queries: 0}}}}
        optimize: {{nominal_accuracy: max, verified_accuracy: max}}
        search: {{algorithm: grid, max_concurrent: 1}}
    """, "i")
    _, _, children = check_tracked(uri, "i", "ibp", 1)
    metrics = children[0].data.metrics
    # a proof is a lower bound of the attacked figure, which is one of the nominal
    assert 0 < metrics["verified_accuracy"] <= metrics["robust_accuracy"] + 1e-9
    assert metrics["robust_accuracy"] <= metrics["nominal_accuracy"]


def test_readme_example_runs_as_readme_says(tmp_path):
    """examples/own_model: `python train.py`, then both spaces' smoke tests from that folder."""
    example = tmp_path / "own_model"
    shutil.copytree(ROOT / "examples" / "own_model", example,
                    ignore=shutil.ignore_patterns("data", "net.pt", "sweeps", "mlflow.db"))
    import subprocess

    trained = subprocess.run([sys.executable, "train.py"], cwd=example, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (example / "net.pt").is_file() and (example / "data" / "train" / "7").is_dir()
    for space in ("lesci.yaml", "finetune.yaml"):
        done = cli(["--space", space, "--smoke-test"], example)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "Pareto front of" in done.stdout
    listing = cli(["--space", "lesci.yaml", "--list-depths"], example)
    assert listing.returncode == 0 and "features.1.body.2" in listing.stdout
