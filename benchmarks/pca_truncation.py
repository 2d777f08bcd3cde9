"""Truncating a k-component incremental PCA vs fitting m components, each against exact PCA.

    python -m benchmarks.pca_truncation                  # the demo's model, every depth
    python -m benchmarks.pca_truncation --smoke-test     # seconds

The LESCI sweep fits one PCA per depth at the largest ``n_components`` of the space (k) and
truncates it to each trial's m. For exact PCA that is the m-component fit; for incremental PCA
it is not, since every update of an m-component fit discards what lies beyond m. This measures,
on the demo's activations (digits, ``resnet_digits`` trained as the demo trains it, correctly
classified training samples, batches of 256 as ``fit_pca_at_depth`` streams them), how far each
of the two is from exact PCA (an SVD of all those activations, float64):

- ``cos_min``: the smallest cosine of the principal angles between its m-dimensional subspace
  and exact PCA's (1 = the same subspace);
- ``ev_err``: the largest relative error of its m explained variances against exact PCA's;
- ``captured``: the variance of the data inside its subspace over that inside exact PCA's
  (exact PCA's subspace captures the most there is: 1 is the best).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from defenses.activations import stream_activations
from defenses.data import load_dataset
from defenses.models import build_model
from defenses.pca import StreamingPCA
from defenses.trainer import TrainConfig, Trainer


def subspace_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the row spaces of a [m, d] and b [m, d]."""
    qa, qb = np.linalg.qr(a.T)[0], np.linalg.qr(b.T)[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def captured(centred: np.ndarray, components: np.ndarray) -> float:
    """Variance of ``centred`` [n, d] inside the row space of ``components`` [m, d]."""
    q = np.linalg.qr(components.T)[0]
    return float(((centred @ q) ** 2).sum())


def compare(batches: list[torch.Tensor], k: int, ms: list[int]) -> list[dict]:
    """Rows of the table for one depth: per m, the truncated and the direct fit vs exact."""
    X = torch.cat(batches).double().numpy()
    centred = X - X.mean(0)
    _, S, Vt = np.linalg.svd(centred, full_matrices=False)
    exact_ev = S ** 2 / (X.shape[0] - 1)
    big = StreamingPCA(k)
    for batch in batches:
        big.partial_fit(batch)
    big.flush()
    rows = []
    for m in ms:
        direct = StreamingPCA(m)
        for batch in batches:
            direct.partial_fit(batch)
        direct.flush()
        row = {"m": m}
        best = captured(centred, Vt[:m])
        for name, pca in (("truncated", big.truncate(m)), ("direct", direct)):
            components = pca.components_.double().numpy()
            ev = pca.explained_variance_.double().numpy()
            row[f"{name}_cos_min"] = float(subspace_cosines(components, Vt[:m]).min())
            row[f"{name}_ev_err"] = float(np.max(np.abs(ev / exact_ev[:m] - 1)))
            row[f"{name}_captured"] = captured(centred, components) / best
        row["truncated_vs_direct_cos_min"] = float(subspace_cosines(
            big.truncate(m).components_.double().numpy(),
            direct.components_.double().numpy()).min())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32, help="the fit's n_components (demo: 32)")
    parser.add_argument("--m", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--depths", nargs="+",
                        default=["stem", "layer1", "layer2", "layer3", "pool"])
    parser.add_argument("--epochs", type=int, default=5, help="base model (demo: 5)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.k, args.m, args.depths, args.epochs = 8, [4], ["pool"], 1
    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("resnet_digits", splits.num_classes, splits.input_shape, splits.mean,
                        splits.std)
    Trainer(model, splits.train, TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3,
                                             seed=0)).fit()
    model.eval()
    rows = []
    for depth in args.depths:
        batches = [b.activations.detach() for b in stream_activations(
            model, depth, splits.train, 256, only_correct=True)]
        samples, dims = sum(b.shape[0] for b in batches), batches[0].shape[1]
        for row in compare(batches, args.k, args.m):
            row = {"depth": depth, "dims": dims, "samples": samples, "k": args.k, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                                for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
