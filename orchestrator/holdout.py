"""The final evaluation on the test split: once, after the search has ended, for every point of
the Pareto front. This is the only code that reads a dataset's test split.

Selection (the searcher, the schedulers, each LESCI trial's operating point, the front) sees
the validation split only; the figures it chose are then measured again on data the search
never saw, with the same attack suite:

- LESCI: each front trial's decision (its depth, PCA and embedding space, the sweep's shared
  stages) at each of its front points (k, m), and the bare model once (its stage on test);
- IBP and adversarial training: each front trial's final checkpoint.

Each trial's evaluation is a stage (``orchestrator.stages.StageCache``, kind ``test``): a Ray
task with the space's resources computes it once and stores it in the sweep's storage, so a
resumed sweep finds what was done. A test split that cannot be read is bad input: one line,
exit 2, and ``--resume`` once the files are fixed (nothing of the search is lost).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ray

from defenses.data import DatasetError
from orchestrator.space import SpaceError, SweepSpec
from orchestrator.stages import StageCache
from orchestrator.storage import Storage

__all__ = ["evaluate_front", "TestSplitError"]


class TestSplitError(SpaceError):
    """The test split could not be read (a missing or malformed file): bad input, exit 2."""

    __test__ = False  # not a pytest class


@ray.remote(max_retries=0)
def _evaluate(spec_json: dict[str, Any], storage_uri: str, item: dict[str, Any]
              ) -> dict[str, Any]:
    """One front trial on the test split (a stage: computed once, then read back)."""
    from orchestrator.trainables import console, setup, sweep_coordinator

    spec, splits, device = setup(spec_json)
    storage = Storage(storage_uri)
    log = console(storage, f"test {item['trial_id']}")
    cache = StageCache(storage, sweep_coordinator(storage), owner=f"test-{item['trial_id']}",
                       log=log)
    return spec.defense.evaluate_test(spec, splits, device, cache, log, item, storage)


def evaluate_front(spec: SweepSpec, front: list[dict[str, Any]], sweep: str,
                   sweep_storage: Storage, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    """Every front point's figures on the test split, computed by Ray tasks (at most the
    space's ``max_concurrent`` at once, each with its resources).

    Args:
        front: the rows chosen on validation (the front's, and under a grid of objectives
            each objective's own front's), each with ``trial_id`` and, for LESCI, ``config``,
            ``k`` and ``min_votes``, for the training families ``trial_dir``.

    Returns:
        ``{"rows": {(trial_id, k, m) or (trial_id,): {metric: value}}, "base": {...},
        "artifacts": {trial_id: {name: bytes}}}``: LESCI rows per (trial, k, m) and the bare
        model's figures; a training trial's per trial, with its final models (pickled, one per
        seed) and, under ``verify.complete``, its ``verification.npz``.

    Raises:
        TestSplitError: the test split's files could not be read.
    """
    family = spec.defense
    items: dict[str, dict[str, Any]] = {}
    for row in front:
        item = items.setdefault(row["trial_id"], {"trial_id": row["trial_id"],
                                                  "config": row.get("config")})
        family.test_item(item, row)
    options = {"num_cpus": spec.resources.cpu, "num_gpus": spec.resources.gpu}
    spec_json = spec.as_dict()
    todo = list(items.values())
    running: dict[Any, str] = {}
    results: dict[str, dict[str, Any]] = {}
    drain = _drainer(sweep_storage, log)
    start = time.perf_counter()
    log(f"sweep {sweep!r}: the {len(todo)} trial(s) chosen on validation, on the test split "
        "(read once, now)")
    try:
        while todo or running:
            while todo and len(running) < spec.search.max_concurrent:
                item = todo.pop(0)
                ref = _evaluate.options(**options).remote(spec_json, sweep_storage.uri, item)
                running[ref] = item["trial_id"]
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            drain()
            for ref in done:
                results[running.pop(ref)] = ray.get(ref)
    except DatasetError as exc:  # raised in a task: Ray's error is also a DatasetError
        cause = getattr(exc, "cause", None) or exc
        raise TestSplitError(f"test split: {cause}; fix it and continue with --resume "
                             "(the search is kept)") from None
    finally:
        drain()
    log(f"sweep {sweep!r}: test split evaluated in {time.perf_counter() - start:.1f} s")
    rows: dict[tuple, dict[str, Any]] = {}
    base: dict[str, Any] = {}
    budget: dict[str, Any] = {}
    artifacts: dict[str, dict[str, bytes]] = {}
    for trial_id, result in results.items():
        artifacts[trial_id] = result.get("artifacts") or {}
        if family.surface:
            for row in result["rows"]:
                rows[family.row_key({"trial_id": trial_id, **row})] = row
            base = result.get("base") or base
            budget = result.get("budget") or budget
        else:
            rows[(trial_id,)] = result["metrics"]
    return {"rows": rows, "base": base, "budget": budget, "artifacts": artifacts}


def _drainer(sweep_storage: Storage, log: Callable[[str], None]) -> Callable[[], None]:
    """Print the tasks' console lines (sent through the sweep's coordinator)."""
    from orchestrator.trainables import sweep_coordinator

    coordinator = sweep_coordinator(sweep_storage)
    if coordinator is None:
        return lambda: None

    def drain() -> None:
        try:
            lines = ray.get(coordinator.drain.remote(), timeout=5)
        except Exception:
            return
        for line in lines:
            log(f"  {line}")

    return drain
