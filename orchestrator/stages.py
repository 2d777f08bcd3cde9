"""Shared stages of a sweep, computed once per key and kept in the sweep's storage.

LESCI trials share a base model, a PCA per depth (fitted at the largest ``n_components`` of the
space and truncated per trial) and an embedding space per PCA. Each lives at
``<storage>/<sweep>/stages/<kind>-<key>`` with a checksummed manifest, so every node of a cluster
and every resumed run finds it. Within a run, a coordinating Ray actor hands out one claim per
key: the first trial asking computes, the others wait for it, so two concurrent trials never
compute the same stage. Each computation also leaves a record under ``stages/computed/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any, Callable

import ray

from orchestrator.storage import Storage

__all__ = ["stage_key", "StageCoordinator", "StageCache", "coordinator_name"]


def stage_key(inputs: dict[str, Any]) -> str:
    """A short stable hash of a stage's inputs (canonical JSON)."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def coordinator_name(sweep: str) -> str:
    return f"stage-coordinator-{sweep}"


@ray.remote(num_cpus=0)
class StageCoordinator:
    """One claim per key: ``acquire`` returns True to the caller that must compute; the others
    wait until it ``release``s (done: they load it; failed: one of them computes instead).

    It also carries the trials' console lines to the driver (``note``, ``drain``), so that the
    console shows them without Ray's log forwarding."""

    def __init__(self) -> None:
        self._state: dict[str, str] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._lines: list[str] = []

    async def note(self, line: str) -> None:
        self._lines.append(line)
        del self._lines[:-1000]  # a driver that stopped reading must not grow this forever

    async def drain(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines

    async def acquire(self, key: str) -> bool:
        while True:
            state = self._state.get(key)
            if state is None:
                self._state[key] = "running"
                self._events[key] = asyncio.Event()
                return True
            if state == "done":
                return False
            await self._events[key].wait()

    async def release(self, key: str, ok: bool) -> None:
        event = self._events.get(key)
        if ok:
            self._state[key] = "done"
        else:
            self._state.pop(key, None)
        if event is not None:
            event.set()

    async def forget(self, key: str) -> None:
        """A 'done' stage vanished from storage: let the next caller compute it again."""
        if self._state.get(key) == "done":
            self._state.pop(key)


class StageCache:
    """Get-or-compute of stage blobs in storage, coordinated by a ``StageCoordinator``."""

    def __init__(self, storage: Storage, coordinator: Any | None, owner: str = "",
                 log: Callable[[str], None] = print):
        self.storage = storage
        self.coordinator = coordinator
        self.owner = owner
        self.log = log

    def _acquire(self, key: str) -> bool:
        return True if self.coordinator is None else ray.get(self.coordinator.acquire.remote(key))

    def _release(self, key: str, ok: bool) -> None:
        if self.coordinator is not None:
            ray.get(self.coordinator.release.remote(key, ok))

    def get(self, kind: str, inputs: dict[str, Any], compute: Callable[[], bytes],
            label: str = "") -> bytes:
        """The stage's bytes: from storage if present and intact, else computed once.
        ``label``: a few words that tell this stage from the others of its kind (the depth)."""
        key = f"{kind}-{stage_key(inputs)}"
        name = f"stage {kind}{f' {label}' if label else ''} ({key.rsplit('-', 1)[1][:8]})"
        path = f"stages/{key}"
        found = self.storage.get_verified(path)
        if found is not None:
            return found[0]
        while True:
            if not self._acquire(key):
                found = self.storage.get_verified(path)
                if found is not None:
                    return found[0]
                if self.coordinator is not None:
                    ray.get(self.coordinator.forget.remote(key))
                continue
            try:
                found = self.storage.get_verified(path)  # an earlier run may have made it
                if found is not None:
                    self._release(key, True)
                    return found[0]
                start = time.perf_counter()
                self.log(f"{name}: computing")
                data = compute()
                seconds = time.perf_counter() - start
                # the record of the computation first: a kill between the two writes then
                # leaves a record of work whose result was lost, never a result without record
                record = {"key": key, "by": self.owner, "seconds": seconds, "at": time.time()}
                self.storage.write_bytes(f"stages/computed/{key}-{uuid.uuid4().hex[:8]}.json",
                                         json.dumps(record).encode())
                self.storage.put_verified(path, data, {"kind": kind, "inputs": inputs,
                                                       "computed_by": self.owner,
                                                       "seconds": seconds})
                self.log(f"{name}: done in {seconds:.1f} s")
            except BaseException:
                self._release(key, False)
                raise
            self._release(key, True)
            return data
