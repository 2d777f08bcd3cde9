"""The test split is read once, after the search: a sweep on MNIST files (the real IDX format)
whose t10k files are unreadable until the search has ended.

A trial that read the test split would fail on them; the search instead finishes every trial,
and only the final evaluation stumbles (exit 2, one line). With the real files in place,
``--resume`` evaluates the front on test without rerunning a trial, and a second ``--resume``
recomputes nothing.
"""

import numpy as np
import pytest
import yaml

from orchestrator.storage import Storage
from tests.conftest import make_mnist, write_idx
from tests.integration.conftest import (check_tracked, cli, computed_stages,
                                        read_csv_artifact, run_ok, runs_of, sweep_args)

LESCI = {
    "name": "held", "family": "lesci",
    "dataset": {"name": "mnist", "root": "mnist", "val": 40},
    "model": {"name": "ibp_small"},
    "training": {"epochs": 1, "batch_size": 50},
    "params": {"depth": {"grid": ["conv1", "fc1"]}, "n_components": 4, "k": [3],
               "threshold": [0.6, 1.0]},
    "attack": {"eps": 0.1, "steps": 2, "apgd": {"steps": 3, "targets": 1}, "samples": 20},
    "optimize": {"accuracy": "max", "projection_rate": "max", "robust_accuracy": "max"},
    "search": {"algorithm": "grid", "max_concurrent": 2},
}
TRAINING = {
    "name": "held", "family": "adversarial",
    "dataset": {"name": "mnist", "root": "mnist", "val": 40},
    "model": {"name": "ibp_small"},
    "training": {"epochs": 2, "batch_size": 50},
    "params": {"objective": {"choice": {"fgsm": {"eps": 0.1}, "standard": {}}}},
    "attack": {"eps": 0.1, "steps": 2, "suite": {"apgd_steps": 2, "targets": 1,
                                                "square_queries": 5}},
    "optimize": {"nominal_accuracy": "max", "pgd_accuracy": "max"},
    "search": {"algorithm": "grid", "max_concurrent": 2},
}


def write_real_mnist(folder):
    """Learnable enough: each class a bright block in its own place, plus noise."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 10 * row:12 + 10 * row, 2 + 5 * col:7 + 5 * col] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize("space", [LESCI, TRAINING], ids=["lesci", "adversarial"])
def test_the_test_split_is_read_only_after_the_search_and_once(tmp_path, space):
    folder = tmp_path / "mnist"
    make_mnist(folder)
    write_real_mnist(folder)
    real = {name: (folder / name).read_bytes() for name in
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for name in real:  # there, but unreadable: whatever reads them fails
        (folder / name).write_bytes(b"not an IDX file")
    args, uri = sweep_args(tmp_path, yaml.safe_dump(space), "held")
    trials = 2

    first = cli(args, tmp_path)
    assert first.returncode == 2, first.stdout[-3000:] + first.stderr[-3000:]
    # every trial of the search finished without the test split ...
    assert f"trials: {trials} done, 0 running, 0 failed, of {trials}" in first.stdout, \
        first.stdout[-3000:]
    client, parents, children = runs_of(uri, "held")
    assert len(children) == trials and all(c.info.status == "FINISHED" for c in children)
    # ... and only the final evaluation read it: one line naming the file, and the way on
    error = first.stderr.strip().splitlines()
    assert len(error) == 1 and "test split" in error[0] and "t10k" in error[0], first.stderr
    assert "--resume" in error[0]
    assert parents[0].info.status == "RUNNING"  # not reported yet
    assert not any(k.startswith("test_") for c in children for k in c.data.metrics)

    for name, data in real.items():
        (folder / name).write_bytes(data)
    done = run_ok([*args, "--resume"], tmp_path)
    assert "trials ran for" in done.stdout and "(test)" in done.stdout
    family = space["family"]
    client, parent, children = check_tracked(uri, "held", family, trials)
    assert "test_hypervolume" in parent.data.metrics
    assert parent.data.tags["test_split"] == "evaluated"
    for metric in space["optimize"]:
        assert f"selection_gap_{metric}_mean" in parent.data.metrics
    rows = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    front = [r for r in rows if r["pareto_optimal"] == "True"]
    assert front and all(r["test_" + m] != "" for r in front for m in space["optimize"])
    assert all(r["test_" + m] == "" for r in rows if r["pareto_optimal"] == "False"
               for m in space["optimize"])
    for row in front:  # every figure with its interval, val and test
        for prefix in ("", "test_"):
            for m in space["optimize"]:
                low, value, high = (float(row[f"{prefix}{m}_ci_low"]), float(row[prefix + m]),
                                    float(row[f"{prefix}{m}_ci_high"]))
                assert low <= value <= high
    on_front = [c for c in children if c.data.tags["pareto_optimal"] == "true"]
    assert on_front and all(f"test_{m}" in c.data.metrics for c in on_front
                            for m in space["optimize"])
    # the search ran once: a finished trial was not run again by --resume
    for child in children:
        history = client.get_metric_history(child.info.run_id, list(space["optimize"])[0])
        assert len(history) == (1 if family == "lesci" else space["training"]["epochs"])
    sweep = Storage.from_uri(tmp_path / "sweeps" / "held")
    evaluated = computed_stages(sweep)
    assert evaluated["test"] == len({r["trial_id"] for r in front})
    if family == "lesci":  # the bare model on test, once, beside LESCI's figures
        assert "test_base_robust_accuracy" in parent.data.metrics
        assert evaluated["transfer"] == 2  # val, then test

    again = run_ok([*args, "--resume"], tmp_path)
    assert computed_stages(sweep) == evaluated  # the stored evaluation is read back
    assert "(test)" in again.stdout


def test_ctrl_c_stops_the_search_before_any_front_or_test_figure(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it): Tune saves its
    state and returns; the sweep then must not choose a front of part of the search, nor read
    the test split for it. It says how to go on (exit 130), and --resume finishes the trials
    from their checkpoints, each epoch once."""
    import os
    import signal

    from tests.integration.conftest import check_each_trial_once, poll_sweep, stop_driver

    folder = tmp_path / "mnist"
    make_mnist(folder)
    write_real_mnist(folder)
    real = {name: (folder / name).read_bytes() for name in
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for name in real:  # a premature final evaluation would stop with exit 2 on these
        (folder / name).write_bytes(b"not an IDX file")
    epochs = 40
    space = {**TRAINING, "training": {**TRAINING["training"], "epochs": epochs}}
    args, uri = sweep_args(tmp_path, yaml.safe_dump(space), "held")
    driver = cli(args, tmp_path, start_new_session=True)
    try:
        started = poll_sweep(driver, uri, "held", lambda client, children: any(
            client.get_metric_history(c.info.run_id, "nominal_accuracy") for c in children))
        assert started, driver.stdout.read()[-3000:] if driver.poll() is not None else ""
        os.killpg(driver.pid, signal.SIGINT)
        output, _ = driver.communicate(timeout=300)
    finally:
        stop_driver(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted with" in output and "--resume" in output, output[-3000:]
    assert "Pareto front" not in output and "test split" not in output, output[-3000:]
    client, parents, children = runs_of(uri, "held")
    assert parents[0].info.status == "KILLED"
    assert not any(k.startswith("test_") for r in parents + children for k in r.data.metrics)

    for name, data in real.items():
        (folder / name).write_bytes(data)
    done = run_ok([*args, "--resume"], tmp_path)
    assert "(test)" in done.stdout
    check_each_trial_once(uri, "held", 2, epochs, metric="nominal_accuracy")
