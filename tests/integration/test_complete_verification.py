"""Complete verification of the front (``verify: {complete: true}``) in a real sweep: the front's
child run logs the decided figures with intervals, its ``verification.npz`` and its final model
with MLflow's PyTorch flavour; the model loads in a fresh process, every stored counterexample
is in its ball and fools the logged model, and an independent attack breaks no proved sample."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from defenses.attacks import default_alpha, pgd
from defenses.complete import FALSIFIED, PROVED, UNDECIDED
from defenses.data import load_dataset
from tests.integration.conftest import ROOT, front_trials, run_ok, runs_of, sweep_args

SAMPLES = 360  # the whole test split: its figures compare with the sweep's own
SPACE = textwrap.dedent(f"""
    name: complete
    family: ibp
    dataset: {{name: digits}}
    model: {{name: ibp_small, options: {{padding: same}}}}
    training: {{epochs: 8, batch_size: 50, lr: 0.003, optimizer: adam}}
    params:
      eps_train: 0.1
      kappa_final: 0.5
      rampup: 20
    attack: {{eps: 0.1, steps: 5, suite: {{apgd_steps: 5, targets: 1, square_queries: 10}}}}
    optimize: {{verified_accuracy: max, nominal_accuracy: max}}
    search: {{algorithm: grid}}
    verify: {{complete: true, time_limit: 5, samples: {SAMPLES}}}
""")


def test_the_front_is_verified_completely_and_its_model_is_in_mlflow(tmp_path):
    args, uri = sweep_args(tmp_path, SPACE, "complete")
    done = run_ok(args, tmp_path)
    assert "complete verification at eps 0.1: proved" in done.stdout  # the trial's line
    assert re.search(r"complete verification, trial \w+ \(test, 360 samples\): proved "
                     r"[\d.]+ \([\d.]+-[\d.]+\), undecided [\d.]+, falsified [\d.]+; robust "
                     r"accuracy (exactly|in \[)", done.stdout), done.stdout[-2000:]
    client, parents, children = runs_of(uri, "complete")
    (child,) = children
    assert front_trials(client, parents[0]) == {child.data.tags["ray_trial_id"]}
    metrics = child.data.metrics
    proved = metrics["test_verified_complete_accuracy"]
    assert metrics["test_verify_samples"] == SAMPLES
    assert metrics["test_verified_complete_accuracy_ci_low"] <= proved
    assert proved <= metrics["test_verified_complete_accuracy_ci_high"]
    assert proved + metrics["test_falsified_rate"] + metrics["test_undecided_rate"] == (
        pytest.approx(1.0))
    # the bracket: the best incomplete certificate <= proved <= the attack suite's worst case
    assert metrics["test_verified_accuracy"] <= proved <= metrics["test_robust_accuracy"]
    assert "test_verified_alpha_crown_accuracy" in metrics

    # the model, loaded in a fresh process from runs:/<run>/model
    run_id = child.info.run_id
    saved = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import mlflow, mlflow.pytorch, torch
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pytorch.load_model("runs:/{run_id}/model")
        torch.save(model(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))),
                   {str(saved)!r})
    """)], cwd=tmp_path, check=True, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    with torch.no_grad():
        probe = model(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(probe, torch.load(saved))

    found = np.load(client.download_artifacts(run_id, "verification.npz"))
    status = found["status"]
    assert len(status) == SAMPLES and set(np.unique(status)) <= {UNDECIDED, PROVED, FALSIFIED}
    assert np.mean(status == PROVED) == pytest.approx(proved)
    assert "milp" in set(found["by"])  # the programs decided some samples, not the bounds alone
    splits = load_dataset("digits")
    x = torch.stack([splits.test[i][0] for i in range(SAMPLES)])
    y = torch.tensor([splits.test[i][1] for i in range(SAMPLES)])
    # every counterexample: the test sample it claims, in its ball, misclassified
    falsified = found["falsified"]
    assert (falsified == np.flatnonzero(status == FALSIFIED)).all()
    assert np.allclose(found["x"], x[falsified].numpy())
    assert (found["y"] == y[falsified].numpy()).all()
    assert len(falsified)  # an IBP model at its training radius: some samples fall
    x_adv = torch.from_numpy(found["x_adv"])
    assert (x_adv - x[falsified]).abs().max() <= 0.1 + 1e-6
    assert (x_adv.min() >= 0) and (x_adv.max() <= 1)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y[falsified]).all()
    mask = torch.from_numpy(status == PROVED)
    # an independent attack breaks no proved sample
    if mask.any():
        adv = pgd(model, x[mask], y[mask], 0.1, default_alpha(0.1, 50), 50, restarts=5,
                  generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert (model(adv).argmax(1) == y[mask]).all()
