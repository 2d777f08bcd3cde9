"""Shared stages: storage hit/miss, verified reads, one computation under concurrency."""

import json
import time

import pytest
import ray

from orchestrator.stages import StageCache, StageCoordinator, stage_key
from orchestrator.storage import Storage


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def records(storage: Storage) -> list[dict]:
    return [json.loads(storage.read_bytes(f"stages/computed/{name}"))
            for name in storage.list("stages/computed")]


def test_hit_miss_and_corruption_without_ray(tmp_path):
    storage = Storage.from_uri(tmp_path)
    cache = StageCache(storage, None, owner="t", log=lambda _m: None)
    calls = []
    compute = lambda: calls.append(1) or b"payload"  # noqa: E731
    assert cache.get("pca", {"depth": "stem"}, compute) == b"payload"  # miss
    assert cache.get("pca", {"depth": "stem"}, compute) == b"payload"  # hit
    assert len(calls) == 1
    assert cache.get("pca", {"depth": "pool"}, compute) == b"payload"  # other key: miss
    assert len(calls) == 2
    # a blob that no longer matches its checksum is recomputed, never used
    path = tmp_path / "stages" / f"pca-{stage_key({'depth': 'stem'})}"
    path.write_bytes(b"payl")
    assert cache.get("pca", {"depth": "stem"}, compute) == b"payload"
    assert len(calls) == 3 and path.read_bytes() == b"payload"
    assert len(records(storage)) == 3


def test_concurrent_trials_compute_a_stage_once(tmp_path, local_ray):
    storage = Storage.from_uri(tmp_path)
    coordinator = StageCoordinator.remote()

    @ray.remote(num_cpus=0)
    def trial(owner: str) -> bytes:
        cache = StageCache(storage, coordinator, owner=owner, log=lambda _m: None)

        def slow() -> bytes:
            time.sleep(2.0)
            return b"embedding space"

        return cache.get("space", {"pca": "k"}, slow)

    results = ray.get([trial.remote(f"t{i}") for i in range(4)])
    assert results == [b"embedding space"] * 4
    assert len(records(storage)) == 1


def test_a_failed_computation_hands_the_claim_to_a_waiter(tmp_path, local_ray):
    storage = Storage.from_uri(tmp_path)
    coordinator = StageCoordinator.remote()

    @ray.remote(num_cpus=0, max_retries=0)
    def trial(owner: str, fail: bool) -> bytes:
        cache = StageCache(storage, coordinator, owner=owner, log=lambda _m: None)

        def compute() -> bytes:
            time.sleep(1.0)
            if fail:
                raise RuntimeError("node lost")
            return owner.encode()

        return cache.get("base", {"model": "m"}, compute)

    failing = trial.remote("first", True)
    time.sleep(0.3)  # the failing trial holds the claim
    waiting = trial.remote("second", False)
    with pytest.raises(ray.exceptions.RayTaskError, match="node lost"):
        ray.get(failing)
    assert ray.get(waiting) == b"second"
    assert [r["by"] for r in records(storage)] == ["second"]
