"""Performance comparisons, side by side in one run, printed as a table and JSON.

    python -m benchmarks.run                 # every comparison
    python -m benchmarks.run --only pca --dims 65536 262144 --batches 8
    python -m benchmarks.run --only pca_large_batch   # one 4,000-row update: sliced vs whole
    python -m benchmarks.run --only demo     # the demo, one trial at a time and two at once
    python -m benchmarks.run --only layout   # an attack step's passes: NCHW vs channels_last

Shared CPU machines are noisy: read the ratios, not the absolute times. Each measured backend
runs in its own fresh process, so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# streaming PCA: torch backend vs scikit-learn IncrementalPCA on the same stream


PCA_DATA = ("lowrank", "noise", "activations")


@functools.lru_cache(maxsize=2)
def _activation_source(side: int):
    """(model, images): an untrained ResNet-18 (seed 0, small stem) for 3 x side x side inputs,
    and mnist5k's training digits resized to side x side in three channels: its ``layer1``
    gives 64 * side^2 real activations per image (65,536 at 32, 262,144 at 64)."""
    import torch
    import torch.nn.functional as F

    from defenses.data import load_dataset
    from defenses.models import build_model

    splits = load_dataset("mnist5k")
    images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    images = F.interpolate(images, size=(side, side), mode="bilinear",
                           align_corners=False).expand(-1, 3, -1, -1).contiguous()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, side, side), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                        stem="small").eval()
    return model, images


def _pca_batch(d: int, batch: int, index: int, rank: int, data: str = "lowrank"):
    """Batch ``index`` of a seeded float32 stream (same in every process).

    ``lowrank``: a signal of ``rank`` = n_components directions with variances 100 .. 1, far
    above the noise bulk (with d >> samples the noise's sample eigenvalues sit near
    1e-4 * d / n), so the retained subspace is well defined and two correct solvers must agree
    on it. ``noise``: full-rank standard normal rows. ``activations``: ResNet-18's ``layer1``
    on mnist5k digits (``_activation_source``; d = 64 * side^2).
    """
    import torch

    if data == "noise":
        gen = torch.Generator().manual_seed(10_000 + index)
        return torch.randn(batch, d, generator=gen)
    if data == "activations":
        side = math.isqrt(d // 64)
        if 64 * side * side != d:
            raise ValueError(f"activations: d = 64 * side^2, got {d}")
        from defenses.capture import capture

        model, images = _activation_source(side)
        with torch.no_grad(), capture(model, ["layer1"]) as seen:
            model(images[index * batch:(index + 1) * batch])
        return seen["layer1"][0].flatten(1).contiguous()
    gen = torch.Generator().manual_seed(1234)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0].T
    scales = torch.logspace(1, 0, rank)
    gen = torch.Generator().manual_seed(10_000 + index)
    x = (torch.randn(batch, rank, generator=gen) * scales) @ basis
    for start in range(0, batch, 32):  # noise a few rows at a time: no extra full-size temp
        x[start:start + 32] += 0.01 * torch.randn(x[start:start + 32].shape, generator=gen)
    return x


def pca_worker(backend: str, d: int, k: int, batch: int, batches: int, out: str,
               device: str | None, dtype: str = "float32", data: str = "lowrank") -> None:
    import torch

    from defenses.pca import StreamingPCA

    pca = StreamingPCA(k, backend=backend, device=device)
    times = []
    for i in range(batches):
        x = _pca_batch(d, batch, i, rank=k, data=data)
        if dtype == "float64":  # (the float32 batch freed before the update is timed)
            x = x.double()
        if device:
            x = x.to(device)
            torch.cuda.synchronize() if x.is_cuda else None
        start = time.perf_counter()
        pca.partial_fit(x)
        if device and x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del x
    np.save(out, pca.components_.cpu().numpy())
    np.save(out.replace(".npy", "_s.npy"), np.asarray(pca.singular_values_.cpu()
                                                      if torch.is_tensor(pca.singular_values_)
                                                      else pca.singular_values_))
    peak_gb = _peak_rss_gb()
    # the first update has no history to stack: report the steady state when there is one
    steady = times[1:] if len(times) > 1 else times
    route = pca._state.last_route if backend == "torch" else "svd"
    print(json.dumps({"sec_per_batch": float(np.mean(steady)), "peak_rss_gb": peak_gb,
                      "route": route}))


def _peak_rss_gb() -> float:
    """This process's peak resident memory in GB: Linux's VmHWM, the peak of the process's own
    address space (``ru_maxrss`` survives fork and exec, so a worker would report its parent's
    peak at the fork if that was larger)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _run_worker(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _exact_components(d: int, k: int, batch: int, batches: int, data: str) -> np.ndarray:
    """Exact PCA's top-k components of the whole stream: an SVD of all of it, centred, in
    float64."""
    import torch

    x = torch.cat([_pca_batch(d, batch, i, rank=k, data=data).double() for i in range(batches)])
    x -= x.mean(0)
    return torch.linalg.svd(x, full_matrices=False)[2][:k].numpy()


def _subspace_gap(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the smallest cosine of the principal angles between the row spaces of a and b."""
    qa, qb = np.linalg.qr(a.T)[0], np.linalg.qr(b.T)[0]
    return 1.0 - float(np.linalg.svd(qa.T @ qb, compute_uv=False).min())


def bench_pca(dims: list[int], k: int, batch: int, batches: int, device: str | None,
              dtypes: list[str] = ("float32",), data_kinds: list[str] = ("lowrank",),
              exact_up_to: int = 65_536) -> list[dict]:
    """Each backend in a fresh process, per data, dims and input dtype; the torch backend's
    route (``gram``, ``tsqr``, ``svd``) of its last update; the batch's own size beside the
    peak memory (the input is in memory either way); at most ``exact_up_to`` dims, each fit's
    gap to exact PCA."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data, d, dtype in itertools.product(data_kinds, dims, dtypes):
            result = {"benchmark": "streaming_pca", "data": data, "dims": d, "n_components": k,
                      "batch": batch, "samples": batch * batches, "dtype": dtype,
                      "batch_gb": batch * d * (8 if dtype == "float64" else 4) / 1024 ** 3}
            components, values = {}, {}
            backends = ["torch", "sklearn"]
            for backend in backends:
                out = f"{tmp}/{backend}_{d}.npy"
                dev = device if backend == "torch" else None
                measured = _run_worker(["pca", backend, str(d), str(k), str(batch), str(batches),
                                        out, dev or "", dtype, data])
                result[f"{backend}_sec_per_batch"] = measured["sec_per_batch"]
                result[f"{backend}_peak_rss_gb"] = measured["peak_rss_gb"]
                if backend == "torch":
                    result["torch_route"] = measured["route"]
                components[backend] = np.load(out).astype(np.float64)
                values[backend] = np.load(out.replace(".npy", "_s.npy")).astype(np.float64)
            qa = np.linalg.qr(components["torch"].T)[0]
            qb = np.linalg.qr(components["sklearn"].T)[0]
            result["subspace_agreement"] = float(np.linalg.svd(qa.T @ qb, compute_uv=False).min())
            # 1 - the smallest principal cosine, and the singular values' largest relative gap
            result["subspace_gap"] = 1.0 - result["subspace_agreement"]
            result["singular_value_gap"] = float(np.max(np.abs(values["torch"] - values["sklearn"])
                                                        / values["sklearn"]))
            if d <= exact_up_to:  # how far incremental PCA is from exact PCA, both backends
                exact = _exact_components(d, k, batch, batches, data)
                result["torch_exact_gap"] = _subspace_gap(components["torch"], exact)
                result["sklearn_exact_gap"] = _subspace_gap(components["sklearn"], exact)
            result["speedup_vs_sklearn"] = (result["sklearn_sec_per_batch"]
                                            / result["torch_sec_per_batch"])
            if device:
                result["torch_device"] = device
            rows.append(result)
            print(json.dumps(result), flush=True)
    return rows


def pca_large_batch_worker(route: str, d: int, k: int, rows: int, out: str) -> None:
    """One partial_fit of ``rows`` rows after a first batch of 256: the torch backend's
    default (a wide batch folds in slices of max(512, 2k) rows) or ``whole`` (one update of
    the whole batch: a Gram matrix of (k + rows + 1)^2, the route before slicing)."""
    from defenses.pca import StreamingPCA

    pca = StreamingPCA(k).partial_fit(_pca_batch(d, 256, 0, rank=k))
    x = _pca_batch(d, rows, 1, rank=k)
    start = time.perf_counter()
    if route == "whole":
        pca._state._update(x)
    else:
        pca.partial_fit(x)
    seconds = time.perf_counter() - start
    np.save(out, pca.components_.cpu().numpy())
    print(json.dumps({"seconds": seconds, "peak_rss_gb":
                      _peak_rss_gb()}))


def bench_pca_large_batch(d: int, k: int, rows: int) -> list[dict]:
    row = {"benchmark": "pca_large_batch", "dims": d, "n_components": k, "rows": rows}
    components = {}
    with tempfile.TemporaryDirectory() as tmp:
        for route in ("sliced", "whole"):
            measured = _run_worker(["pca_large_batch", route, str(d), str(k), str(rows),
                                    f"{tmp}/{route}.npy"])
            row[f"{route}_sec"] = measured["seconds"]
            row[f"{route}_peak_rss_gb"] = measured["peak_rss_gb"]
            components[route] = np.load(f"{tmp}/{route}.npy").astype(np.float64)
    qa = np.linalg.qr(components["sliced"].T)[0]
    qb = np.linalg.qr(components["whole"].T)[0]
    row["subspace_agreement"] = float(np.linalg.svd(qa.T @ qb, compute_uv=False).min())
    row["speedup"] = row["whole_sec"] / row["sliced_sec"]
    print(json.dumps(row), flush=True)
    return [row]


def stream_worker(images: int, batch: int, k: int, device: str | None) -> None:
    """Streaming PCA end to end: synthetic 3x64x64 images (Tiny ImageNet's size) through
    ResNet-18 to its 262,144-dim depth ``layer1``, folded into a 64-component PCA."""
    import torch

    from defenses.activations import stream_activations
    from defenses.models import build_model
    from defenses.pca import StreamingPCA

    dev = torch.device(device or "cpu")
    torch.manual_seed(0)
    model = build_model("resnet18", 200, (3, 64, 64), (0.48, 0.45, 0.40),
                        (0.28, 0.27, 0.28)).to(dev).eval()

    def synthetic():
        gen = torch.Generator().manual_seed(1)
        for start in range(0, images, batch):
            n = min(batch, images - start)
            yield torch.rand(n, 3, 64, 64, generator=gen), torch.randint(0, 200, (n,),
                                                                         generator=gen)

    pca = StreamingPCA(k, device=dev)
    start = time.perf_counter()
    dims = 0
    for out in stream_activations(model, "layer1", synthetic(), batch, dev):
        dims = out.activations.shape[1]
        pca.partial_fit(out.activations)
    pca.flush()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"dims": dims, "seconds": seconds, "samples_per_sec": images / seconds,
                      "peak_rss_gb": _peak_rss_gb(),
                      "peak_gpu_gb": (torch.cuda.max_memory_allocated() / 1024 ** 3
                                      if dev.type == "cuda" else None)}))


def bench_stream(images: int, batch: int, k: int, device: str | None) -> list[dict]:
    measured = _run_worker(["stream", str(images), str(batch), str(k), device or ""])
    row = {"benchmark": "stream_pca", "model": "resnet18", "input": "3x64x64",
           "depth": "layer1", "images": images, "batch": batch, "n_components": k,
           "device": device or "cpu", **measured}
    print(json.dumps(row), flush=True)
    return [row]


# ------------------------------------------------------------------------------------------------
# kNN vote: knn_vote / KnnIndex vs faiss-cpu IndexFlatIP search plus a vectorised vote


def _numpy_vote(neighbour_labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label (lowest on ties) and its fraction, per row, with one bincount."""
    q, k = neighbour_labels.shape
    offsets = neighbour_labels + num_classes * np.arange(q)[:, None]
    counts = np.bincount(offsets.ravel(), minlength=q * num_classes).reshape(q, num_classes)
    return counts.argmax(1), counts.max(1) / k


def _best_of_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds, the functions taking turns in each
    round so that machine noise hits them alike (after one warm-up round)."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_knn(n: int, dim: int, queries: int, k: int, num_classes: int, repeats: int,
              device: str | None) -> list[dict]:
    import faiss
    import torch

    from defenses.knn import KnnIndex, knn_vote

    gen = torch.Generator().manual_seed(0)
    # clustered data, like an embedding space: class centres plus spread
    centres = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    emb = centres[labels] + 1.5 * torch.randn(n, dim, generator=gen)
    q_labels = torch.randint(0, num_classes, (queries,), generator=gen)
    qs = centres[q_labels] + 1.5 * torch.randn(queries, dim, generator=gen)

    faiss.omp_set_num_threads(torch.get_num_threads())
    emb_n = torch.nn.functional.normalize(emb, dim=1).numpy()
    qs_n = torch.nn.functional.normalize(qs, dim=1).numpy()
    labels_np = labels.numpy()
    reference = faiss.IndexFlatIP(dim)
    reference.add(emb_n)

    def faiss_vote():
        _, idx = reference.search(qs_n, k)
        return _numpy_vote(labels_np[idx], num_classes)

    row = {"benchmark": "knn_vote", "embeddings": n, "dim": dim, "queries": queries, "k": k,
           "threads": torch.get_num_threads()}
    backends = {"auto": KnnIndex(emb, labels, num_classes=num_classes),
                "torch": KnnIndex(emb, labels, backend="torch", num_classes=num_classes)}
    row["auto_backend"] = backends["auto"].backend
    times = _best_of_interleaved({
        "faiss": faiss_vote,
        "auto": lambda: backends["auto"].vote(qs, k),
        "torch": lambda: backends["torch"].vote(qs, k),
        # the one-shot function: normalises and indexes the embedding space on every call
        "knn_vote_oneshot": lambda: knn_vote(qs, emb, labels, k)}, repeats)
    row.update({f"{name}_sec": value for name, value in times.items()})
    expected = faiss_vote()
    for name, index in backends.items():
        majority, fraction = index.vote(qs, k)
        row[f"{name}_same_answers"] = float(np.mean(
            (majority.numpy() == expected[0]) & np.isclose(fraction.numpy(), expected[1])))
    row["faiss_over_auto"] = row["faiss_sec"] / row["auto_sec"]
    row["faiss_over_torch"] = row["faiss_sec"] / row["torch_sec"]
    if device and device != "cpu":
        index = KnnIndex(emb, labels, num_classes=num_classes, device=device)
        q_dev = qs.to(device)

        def on_device():
            index.vote(q_dev, k)
            torch.cuda.synchronize()

        row["device"] = device
        row["device_torch_sec"] = _best_of_interleaved({"device": on_device}, repeats)["device"]
        row["faiss_cpu_over_device_torch"] = row["faiss_sec"] / row["device_torch_sec"]
    print(json.dumps(row), flush=True)
    return [row]


# ------------------------------------------------------------------------------------------------
# training steps: IBP and PGD-k adversarial training vs a nominal step, same model and batch


def _step_seconds(model, objective, x, y, repeats: int) -> float:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective.loss(model, x, y, 10_000, gen)
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_training_steps(models: list[str], input_shape: tuple[int, int, int], batch: int,
                         pgd_steps: int, repeats: int, device: str | None) -> list[dict]:
    import torch

    from defenses.models import build_model
    from defenses.objectives import make_objective

    torch.manual_seed(0)
    rows = []
    x = torch.rand(batch, *input_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    objectives = {
        "nominal": make_objective("standard"),
        "ibp": make_objective("ibp", eps_train=0.1, kappa_final=0.5),
        f"pgd{pgd_steps}": make_objective("pgd", eps=0.1, alpha=0.025, steps=pgd_steps),
    }
    for name in models:
        model = build_model(name, 10, input_shape, (0.5,) * input_shape[0],
                            (0.25,) * input_shape[0]).to(device or "cpu").train()
        # interleave the objectives so machine noise hits them alike
        seconds = {key: [] for key in objectives}
        for _ in range(3):
            for key, objective in objectives.items():
                seconds[key].append(_step_seconds(model, objective, x, y, repeats))
        med = {key: float(np.median(v)) for key, v in seconds.items()}
        row = {"benchmark": "training_step", "model": name, "batch": batch,
               "input": "x".join(map(str, input_shape)), "nominal_sec": med["nominal"],
               "ibp_sec": med["ibp"], "ibp_ratio": med["ibp"] / med["nominal"],
               f"pgd{pgd_steps}_sec": med[f"pgd{pgd_steps}"],
               f"pgd{pgd_steps}_ratio": med[f"pgd{pgd_steps}"] / med["nominal"],
               "device": device or "cpu"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# sweep overhead: a 24-trial LESCI sweep vs its distinct stages and evaluations run directly

SWEEP_SPACE = {
    "name": "overhead", "family": "lesci",
    "dataset": {"name": "digits"}, "model": {"name": "resnet_digits"},
    "training": {"epochs": 5, "batch_size": 64, "lr": 0.003, "seed": 0},
    "params": {"depth": {"grid": ["layer1", "layer2"]},
               "n_components": {"grid": [4, 8, 12, 16]},
               "embedding_size": {"grid": [500, 1000, 1400]},
               "k": [3, 5, 10], "threshold": [0.5, 0.6, 0.8, 0.9]},
    "optimize": {"accuracy": "max", "projection_rate": "max"},
    "search": {"algorithm": "grid", "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0},
}
# the attack suite at a budget that keeps the benchmark to minutes
SWEEP_ATTACK = {"eps": 0.1, "steps": 20, "apgd": {"steps": 20, "targets": 0}, "samples": 120}


def sweep_direct_worker(space_file: str) -> None:
    """The sweep's work without Ray or MLflow: each distinct stage once (base model, PCA and
    embedding space per depth, attacks on the base model), then every trial's surface, one
    after another in this process, with the trials' own functions."""
    import io
    import itertools

    import torch

    from defenses.embedding_space import build_embedding_space
    from defenses.lesci import fit_pca_at_depth
    from defenses.lesci_attack import LESCIDecision
    from orchestrator.loading import load_space
    from orchestrator.lesci_stages import craft_transfer_set, train_base_model
    from orchestrator.lesci_trial import lesci_surface

    spec = load_space(space_file)
    grid = spec.grid_values()
    points = spec.defense.surface_points(spec)
    start = time.perf_counter()
    splits = spec.dataset.load()
    model = train_base_model(spec, splits, None, spec.training).eval()
    attacks = None
    if spec.attack is not None:
        attacks = torch.load(io.BytesIO(craft_transfer_set(model, splits.val, spec.attack, None)),
                             weights_only=True)
    stages = time.perf_counter() - start
    evaluations, trials = 0.0, 0
    for depth in grid["depth"]:
        t0 = time.perf_counter()
        pca = fit_pca_at_depth(model, depth, splits.train, max(grid["n_components"]))
        space = build_embedding_space(model, depth, pca, splits.train)
        stages += time.perf_counter() - t0
        for n_components, size in itertools.product(grid["n_components"],
                                                    grid["embedding_size"]):
            t0 = time.perf_counter()
            decision = LESCIDecision(model, depth, pca.truncate(n_components),
                                     space.truncate(n_components, min(size, len(space))),
                                     max(p.k for p in points), num_classes=splits.num_classes)
            lesci_surface(spec, decision, points, splits.val, attacks, None)
            evaluations += time.perf_counter() - t0
            trials += 1
    print(json.dumps({"stages_sec": stages, "evaluations_sec": evaluations, "trials": trials}))


def bench_sweep() -> list[dict]:
    """The overhead sweep twice: without an attack (evaluations of milliseconds: the fixed
    costs show) and with an attack suite (each trial also attacks its whole surface)."""
    import yaml

    rows = []
    for attack in (None, SWEEP_ATTACK):
        space = dict(SWEEP_SPACE, **({"attack": attack} if attack else {}))
        with tempfile.TemporaryDirectory() as tmp:
            space_file = Path(tmp, "overhead.yaml")
            space_file.write_text(yaml.safe_dump(space))
            direct = _run_worker(["sweep_direct", str(space_file)])
            env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AIR_NEW_OUTPUT="1")
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(ROOT / "search.py"), "--space", str(space_file), "--name",
                 "overhead", "--storage", f"{tmp}/sweeps", "--mlflow-uri",
                 f"sqlite:///{tmp}/mlflow.db"], capture_output=True, text=True, cwd=tmp, env=env)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark sweep failed:\n{proc.stdout[-3000:]}"
                                   f"{proc.stderr[-3000:]}")
        trials = direct["trials"]
        work = direct["stages_sec"] + direct["evaluations_sec"]
        fit = float(re.search(r"trials ran for ([\d.]+) s", proc.stdout).group(1))
        row = {"benchmark": "sweep_overhead",
               "attack": "suite (PGD-20, APGD-20)" if attack else "none",
               "trials": trials, "direct_stages_sec": direct["stages_sec"],
               "direct_evaluations_sec": direct["evaluations_sec"], "direct_sec": work,
               "sweep_trials_sec": fit, "sweep_wall_sec": wall,
               "trials_over_direct": fit / work, "wall_over_direct": wall / work,
               "fixed_sec": wall - fit, "overhead_per_trial_sec": (fit - work) / trials}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def machine_calibration(device: str | None = None) -> float:
    """Seconds per 256-row update of a 64-component torch StreamingPCA at 262,144 dims (the
    PCA figure of docs/performance.md), measured in a fresh process: how fast this machine is,
    so that a time measured here can be read against another machine's."""
    with tempfile.TemporaryDirectory() as tmp:
        measured = _run_worker(["pca", "torch", "262144", "64", "256", "3", f"{tmp}/c.npy",
                                device or "", "float32", "lowrank"])
    return float(measured["sec_per_batch"])


def _demo_run(extra: list[str]) -> dict:
    """``python search.py`` (plus ``extra``) in a fresh folder: wall time, the trials' time,
    the test evaluation's and the front's size."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "search.py"), *extra],
                              capture_output=True, text=True, cwd=tmp, env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the demo failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    found = re.search(r"(\d+) of (\d+) surface points, hypervolume ([\d.]+) \(val\), "
                      r"([\d.]+) \(test\)", proc.stdout)
    trials = float(re.search(r"trials ran for ([\d.]+) s", proc.stdout).group(1))
    tested = float(re.search(r"test split evaluated in ([\d.]+) s", proc.stdout).group(1))
    return {"wall_sec": wall, "trials_sec": trials, "test_sec": tested,
            "front_points": int(found.group(1)), "surface_points": int(found.group(2)),
            "hypervolume_val": float(found.group(3)), "hypervolume_test": float(found.group(4))}


def bench_demo() -> list[dict]:
    """``python search.py`` as a user runs it (two trials at once on two cores), beside the
    same demo one trial at a time (``--max-concurrent 1``): the trials' throughput with two at
    once over one, and this machine's PCA figure to read the times against."""
    calibration = machine_calibration()
    rows = []
    for concurrent in (1, 2):
        extra = ["--max-concurrent", "1"] if concurrent == 1 else []
        row = {"benchmark": "demo", "command": " ".join(["python search.py", *extra]),
               "concurrent_trials": concurrent, "cpus": os.cpu_count(), **_demo_run(extra),
               "pca_sec_per_batch_262144": calibration}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[1]["throughput_vs_one"] = rows[0]["trials_sec"] / rows[1]["trials_sec"]
    return rows


# ------------------------------------------------------------------------------------------------
# memory layout: NCHW against channels_last, on the attacks' hot loop


def bench_layout(batch: int, repeats: int) -> list[dict]:
    """A forward and input-gradient pass of ``resnet_digits`` (what every attack step does),
    its weights and inputs in NCHW against channels_last, one thread, taking turns."""
    import torch

    from defenses.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet_digits", 10, (1, 8, 8), (0.3,), (0.4,)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 1, 8, 8)

    def step(layout) -> float:
        z = x.contiguous(memory_format=layout).requires_grad_(True)
        return float(torch.autograd.grad(model(z).logsumexp(1).sum(), z)[0].abs().sum())

    def with_layout(layout):
        def run():
            model.to(memory_format=layout)
            for _ in range(10):
                step(layout)
        return run

    best = _best_of_interleaved({"nchw": with_layout(torch.contiguous_format),
                                 "channels_last": with_layout(torch.channels_last)}, repeats)
    row = {"benchmark": "layout", "model": "resnet_digits", "batch": batch,
           "nchw_sec_per_pass": best["nchw"] / 10,
           "channels_last_sec_per_pass": best["channels_last"] / 10,
           "speedup": best["nchw"] / best["channels_last"]}
    print(json.dumps(row), flush=True)
    return [row]


def print_table(rows: list[dict]) -> None:
    """One markdown table per benchmark, columns in first-seen order."""
    for bench in dict.fromkeys(row["benchmark"] for row in rows):
        group = [row for row in rows if row["benchmark"] == bench]
        keys = [k for k in dict.fromkeys(k for row in group for k in row) if k != "benchmark"]
        print(f"\n{bench}\n| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in group:
            cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                     for k in keys]
            print("| " + " | ".join(cells) + " |")


COMPARISONS = ["pca", "pca_large_batch", "stream", "knn", "steps", "layout", "sweep", "demo"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        name, *rest = argv[1:]
        if name == "pca":
            backend, d, k, batch, batches, out, device, dtype, data = rest
            pca_worker(backend, int(d), int(k), int(batch), int(batches), out, device or None,
                       dtype, data)
        elif name == "pca_large_batch":
            route, d, k, rows, out = rest
            pca_large_batch_worker(route, int(d), int(k), int(rows), out)
        elif name == "stream":
            images, batch, k, device = rest
            stream_worker(int(images), int(batch), int(k), device or None)
        elif name == "sweep_direct":
            sweep_direct_worker(*rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=COMPARISONS, action="append",
                        help="run only these comparisons (default: all)")
    parser.add_argument("--dims", type=int, nargs="+", default=[65_536, 262_144])
    parser.add_argument("--n-components", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--device", default=None, help="torch device for the torch backends")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"],
                        default=["float32", "float64"], help="the PCA inputs' precisions")
    parser.add_argument("--pca-data", nargs="+", choices=PCA_DATA, default=list(PCA_DATA),
                        help="the PCA streams: low-rank signal plus noise, full-rank noise, "
                             "ResNet-18 layer1 activations of mnist5k digits")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    step_models, step_batch, step_repeats = ["ibp_small", "ibp_medium", "ibp_large"], 200, 3
    knn_size, knn_queries, knn_repeats = 100_000, 4096, 5
    # 10,000+ images on a GPU; a CPU anchor of 2,560
    stream_images = 10_240 if args.device and args.device.startswith("cuda") else 2_560
    stream_batch = 256
    large_batch_dims, large_batch_rows = 65_536, 4_000
    if args.smoke_test:
        large_batch_dims, large_batch_rows = 4096, 1200
        args.dims, args.n_components, args.batch, args.batches = [4096], 8, 64, 3
        step_models, step_batch, step_repeats = ["ibp_small"], 16, 1
        knn_size, knn_queries, knn_repeats = 5_000, 256, 1
        stream_images, stream_batch = 64, 32
        layout_batch, layout_repeats = 32, 1
    layout_batch, layout_repeats = 360, 5
    # the smoke test leaves out the two that run whole sweeps (minutes)
    only = set(args.only or (["pca", "pca_large_batch", "stream", "knn", "steps", "layout"]
                             if args.smoke_test else COMPARISONS))
    rows: list[dict] = []
    if "pca" in only:
        rows += bench_pca(args.dims, args.n_components, args.batch, args.batches, args.device,
                          args.dtypes, args.pca_data)
    if "pca_large_batch" in only:
        rows += bench_pca_large_batch(large_batch_dims, args.n_components, large_batch_rows)
    if "stream" in only:
        rows += bench_stream(stream_images, stream_batch, args.n_components, args.device)
    if "knn" in only:
        rows += bench_knn(knn_size, 128, knn_queries, 10, 200, knn_repeats, args.device)
    if "steps" in only:
        rows += bench_training_steps(step_models, (1, 28, 28), step_batch, 7, step_repeats,
                                     args.device)
    if "layout" in only:
        rows += bench_layout(layout_batch, layout_repeats)
    if "sweep" in only:
        rows += bench_sweep()
    if "demo" in only:
        rows += bench_demo()
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
