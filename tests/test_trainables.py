"""What a trial sets up in its Ray worker before it computes."""

import json
import subprocess
import sys


PROBE = """
import json, sys, threading
import faiss, numpy, threadpoolctl, torch
from orchestrator.trainables import limit_threads

def probe(out):
    for cpus in json.loads(sys.argv[1]):
        limit_threads(cpus)
        out.append({"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
                    "pools": {i["filepath"].rsplit("/", 1)[-1]: i["num_threads"]
                              for i in threadpoolctl.threadpool_info()}})

out = []
# Tune runs a function trainable in a thread of its own: probe from one
thread = threading.Thread(target=probe, args=(out,))
thread.start()
thread.join()
print(json.dumps(out))
"""


def test_a_trials_thread_pools_match_its_reserved_cores():
    """torch's pool, faiss's OpenMP and every BLAS/OpenMP runtime threadpoolctl sees: one
    thread per reserved core (at least one), however many cores the machine has; a reused
    worker's next trial sets its own (in a fresh process: the limits are process-wide)."""
    cpus, threads = [1, 0.5, 3, 2], [1, 1, 3, 2]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cpus)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for n, probe in zip(threads, seen):
        assert probe["torch"] == n and probe["faiss"] == n, (n, probe)
        assert probe["pools"] and set(probe["pools"].values()) == {n}, (n, probe["pools"])


def test_figures_over_seeds_are_means_with_their_spread():
    from orchestrator.trainables import over_seeds

    runs = [{"accuracy": [0.5, 0.9], "accuracy_ci_low": [0.4, 0.8], "accuracy_ci_high":
             [0.6, 1.0], "accuracy_projected": [float("nan"), 0.7], "samples": [10, 10]},
            {"accuracy": [0.7, 0.9], "accuracy_ci_low": [0.6, 0.8], "accuracy_ci_high":
             [0.8, 1.0], "accuracy_projected": [float("nan"), 0.9], "samples": [10, 10]}]
    out = over_seeds(runs)
    assert out["accuracy"] == [0.6, 0.9] and out["samples"] == [10, 10]
    assert out["accuracy_ci_low"] == [0.5, 0.8] and out["accuracy_ci_high"] == [0.7, 1.0]
    assert abs(out["accuracy_seed_std"][0] - 0.1414213) < 1e-6  # sample std of 0.5 and 0.7
    assert out["accuracy_seed_std"][1] == 0.0
    assert out["accuracy_projected"][0] != out["accuracy_projected"][0]  # NaN in every seed
    assert abs(out["accuracy_projected"][1] - 0.8) < 1e-12
    assert "accuracy_ci_low_seed_std" not in out and "samples_seed_std" not in out
    one = over_seeds([{"nominal_accuracy": 0.9, "samples": 5.0}])  # one seed: as it is
    assert one == {"nominal_accuracy": 0.9, "samples": 5.0}
