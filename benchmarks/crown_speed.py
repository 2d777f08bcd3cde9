"""Speed of ``defenses.crown`` beside auto_LiRPA 0.7.1 (the reference implementation of CROWN,
CROWN-IBP and alpha-CROWN), side by side in one process: each task alternates ours and
theirs ``--repeats`` times, and the table gives the medians and their ratio (ours / theirs).

- ``full CROWN``: logit bounds by full CROWN (every activation's input bounded by CROWN) of a
  batch of ``--crown-batch`` inputs;
- ``CROWN-IBP margins``: lower bounds of the margins ``z_y - z_j`` by CROWN-IBP (IBP's
  intermediate bounds, CROWN's backward pass from the output) of ``--batch`` inputs;
- ``CROWN-IBP training step``: those margins with gradients, the cross-entropy of the
  certified margins (Zhang et al. 2020's loss with beta 1), backward and an Adam step.

The models are ``ibp_small`` on 28x28 inputs at initialisation (as ``build_model`` makes it),
and, with ``--sweep`` (and ``--mlflow-uri``, ``--storage``), the final model of each front
trial of a finished sweep, e.g. a certified-training sweep of ``crown_ibp_mnist5k``. The inputs
are uniform noise in [0, 1] (a stored sweep's: its first test samples). float32, on
``--threads`` CPU threads (default one), eps ``--eps``.

auto_LiRPA gets what ``benchmarks.crown_crosscheck`` gives it (``lirpa_copy``): install it
from source in an environment of its own, as that module's docstring says.

    python -m benchmarks.crown_speed [--repeats 5] [--batch 100] [--crown-batch 20]
        [--sweep NAME --mlflow-uri URI --storage URI]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.crown_crosscheck import Reference, _default_dtype, _lirpa, _pad_attribute_shim
from defenses.crown import crown_bounds, crown_lower, margin_spec
from defenses.certified_training import certified_margins
from defenses.models import ModelName, build_model

CLASSES = 10
SHAPE = (1, 28, 28)
MEAN, STD = (0.1307,), (0.3081,)


def _median_pair(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int
                 ) -> tuple[float, float]:
    """Medians of ``repeats`` alternating timed calls of each (after one untimed call each)."""
    ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _loss(lower_margins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the certified margins: logits (0, -lower(z_y - z_j)) with the true
    class first (Zhang et al. 2020; the row j = y of a margin spec is 0)."""
    worst = -lower_margins
    return F.cross_entropy(torch.cat([worst.new_zeros(len(worst), 1), worst], 1),
                           worst.new_zeros(len(worst), dtype=torch.long))


def tasks(lirpa: Any, name: str, model: nn.Module, x: torch.Tensor, crown_x: torch.Tensor,
          eps: float, repeats: int) -> list[dict[str, Any]]:
    """The three rows for one model."""
    model = model.float().eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = margin_spec(y, CLASSES, x.dtype)
    rows = []

    crown_ref = Reference(lirpa, model, crown_x, None)

    def ours_crown():
        with torch.no_grad():
            return crown_bounds(model, crown_x, eps, method="crown")

    def theirs_crown():
        return crown_ref.bounds(crown_x, eps, "CROWN")

    rows.append(("full CROWN", len(crown_x), *_median_pair(ours_crown, theirs_crown, repeats)))

    ref = Reference(lirpa, model, x, None)

    def ours_margins():
        with torch.no_grad():
            return crown_lower(model, x, eps, spec, method="crown-ibp")

    def theirs_margins():
        return ref.bounds(x, eps, "CROWN-IBP", C=spec)

    rows.append(("CROWN-IBP margins", len(x), *_median_pair(ours_margins, theirs_margins,
                                                             repeats)))

    ours_opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    theirs_opt = torch.optim.Adam(ref.module.parameters(), lr=1e-6)
    ptb = lirpa.PerturbationLpNorm(norm=float("inf"), x_L=(x - eps).clamp(0, 1),
                                   x_U=(x + eps).clamp(0, 1))
    bounded = lirpa.BoundedTensor(x.contiguous(), ptb)
    wrong = ~F.one_hot(y, CLASSES).bool()  # the margins j != y
    others = spec[wrong].view(len(x), CLASSES - 1, CLASSES)

    def ours_step():
        ours_opt.zero_grad()
        upper, _ = certified_margins(model, x, y, eps, beta=1.0)  # upper(z_j - z_y)
        picked = upper[wrong].view(len(x), -1)
        _loss(-picked).backward()
        ours_opt.step()

    def theirs_step():
        theirs_opt.zero_grad()
        lower, _ = ref.module.compute_bounds(x=(bounded,), method="CROWN-IBP", C=others,
                                             bound_upper=False)
        _loss(lower).backward()
        theirs_opt.step()

    rows.append(("CROWN-IBP training step", len(x), *_median_pair(ours_step, theirs_step,
                                                                   repeats)))
    return [{"model": name, "task": task, "batch": batch, "ours_s": o, "theirs_s": t,
             "ratio": o / t} for task, batch, o, t in rows]


def _stored_models(args) -> list[tuple[str, nn.Module, torch.Tensor]]:
    from benchmarks.stored import final_model, open_sweep

    spec, storage, client, experiment_id = open_sweep(args.sweep, args.mlflow_uri, args.storage)
    front = [r for r in client.search_runs([experiment_id])
             if r.data.tags.get("pareto_optimal") == "true"]
    if not front:
        raise SystemExit(f"--sweep {args.sweep}: no trial tagged pareto_optimal")
    splits = spec.dataset.load()
    x = torch.stack([splits.test[i][0] for i in range(args.batch)]).float()
    return [(f"{spec.model.name} {r.data.tags['ray_trial_id']}",
             final_model(spec, splits, storage, r.data.tags["ray_trial_id"]), x)
            for r in sorted(front, key=lambda r: r.data.tags["ray_trial_id"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="CROWN-IBP's batch")
    parser.add_argument("--crown-batch", type=int, default=20, help="full CROWN's batch")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", help="also a finished sweep's front models")
    parser.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--storage", help="the sweep's storage (with --sweep)")
    args = parser.parse_args(argv)
    if args.sweep and not args.storage:
        parser.error("--sweep needs --storage")
    lirpa = _lirpa()
    _pad_attribute_shim(lirpa)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = [("ibp_small init", build_model(ModelName.IBP_SMALL, CLASSES, SHAPE, MEAN, STD),
               torch.rand(args.batch, *SHAPE, generator=torch.Generator().manual_seed(0)))]
    if args.sweep:
        models += _stored_models(args)
    print(f"auto_LiRPA {getattr(lirpa, '__version__', '?')}; torch {torch.__version__}; "
          f"float32; {args.threads} thread(s); eps {args.eps}; medians of {args.repeats} "
          "alternating runs")
    print(f"{'model':<28} {'task':<24} {'batch':>5} {'ours s':>8} {'auto_LiRPA s':>12} "
          f"{'ratio':>6}")
    with _default_dtype(torch.float32):
        for name, model, x in models:
            for row in tasks(lirpa, name, model, x, x[:args.crown_batch], args.eps,
                             args.repeats):
                print(f"{row['model']:<28} {row['task']:<24} {row['batch']:>5} "
                      f"{row['ours_s']:>8.3f} {row['theirs_s']:>12.3f} {row['ratio']:>6.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
