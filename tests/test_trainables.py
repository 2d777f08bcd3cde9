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
