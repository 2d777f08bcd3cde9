"""``python search.py``: validate a search space, run its sweep on Ray Tune, track it in MLflow,
and print the Pareto front.

Exit codes: 0 done, 2 bad input (one line saying what and where), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from defenses.intervals import format_interval
from orchestrator.reporting import TEST_PREFIX
from orchestrator.arguments import DEFAULT_STORAGE, parse_args
from orchestrator.loading import load_space
from orchestrator.space import SpaceError, check_sweep_name
from orchestrator.storage import Storage, StorageError, redact
from orchestrator.mlflow_client import (TrackingError, TrackingUnavailable,
                                        check_tracking_uri, tracking_failure)



def log(message: str) -> None:
    print(message, flush=True)


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise SpaceError(f"{flag}: must be a positive integer, got {value}")


def format_front(result, spec) -> str:
    """The front as a table: each point's optimized figures with their 95% intervals, on the
    validation split and (below it) on the test split, best first; then each compared
    objective's own front, the bare model and the selection gap."""
    lines = _front_table(result.front, result, spec)
    for name, rows in result.objective_fronts.items():
        lines.append(f"objective {name}: its own front, {len(rows)} of "
                     f"{sum(r.get('objective') == name for r in result.rows)} trials")
        lines.extend(_front_table(rows, result, spec))
    return "\n".join([*lines, *_front_notes(result, spec)])


def _front_table(rows, result, spec) -> list[str]:
    """Rows as table lines, best first, the val figures and below them the test figures."""
    point = spec.defense.point_keys  # a row's point on its trial's surface, with its threshold
    keys = [*spec.searched_names(), *point, *(["threshold"] if point else [])]
    metrics = list(spec.metric_names)
    splits = [("val", "")] + ([("test", TEST_PREFIX)] if result.tested else [])
    width = 18 if spec.search.repeats == 1 else 27  # "0.742 (0.70-0.78) sd 0.012"
    order = sorted(rows, key=lambda r: [-r[m] if spec.optimize[m] == "max" else r[m]
                                        for m in metrics])
    # a column as wide as its header and its values (module paths can be long)
    widths = ([max([len(c), 6, *(len(str(r.get(c, ""))) for r in order)]) for c in keys]
              + [5] + [max(len(m), width) for m in metrics])
    header = [*keys, "split", *metrics]
    lines = ["  ".join(c.rjust(w) for c, w in zip(header, widths))]
    for row in order:
        for i, (split, prefix) in enumerate(splits):
            cells = []
            for key in keys:
                value = row.get(key, "") if i == 0 else ""
                cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
            cells.append(split)
            for m in metrics:
                cell = format_interval(row.get(prefix + m, math.nan),
                                       row.get(f"{prefix}{m}_ci_low", math.nan),
                                       row.get(f"{prefix}{m}_ci_high", math.nan))
                spread = row.get(f"{prefix}{m}_seed_std")
                cells.append(cell if spread is None else f"{cell} sd {spread:.3f}")
            lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return lines


def _front_notes(result, spec) -> list[str]:
    """The lines under the fronts: the bare model, the selection gap, what the intervals mean."""
    lines = []
    splits = [("val", "")] + ([("test", TEST_PREFIX)] if result.tested else [])
    base = result.base
    if "base_accuracy" in base:
        for split, prefix in splits:
            if prefix + "base_accuracy" in base:
                figures = ", ".join(
                    f"{name} " + format_interval(base[prefix + key],
                                                 base.get(f"{prefix}{key}_ci_low", math.nan),
                                                 base.get(f"{prefix}{key}_ci_high", math.nan))
                    for key, name in (("base_accuracy", "accuracy"),
                                      ("base_robust_accuracy", "robust_accuracy"))
                    if prefix + key in base)
                lines.append(f"the bare model ({split}): {figures}")
    if result.tested and spec.verify.complete:
        lines.extend(_bracket_lines(result.front))
    if result.tested:
        gaps = "; ".join(f"{m} {mean:+.3f} (largest {largest:+.3f})"
                         for m, (mean, largest) in result.selection_gap.items())
        lines.append(f"selection gap, val minus test over the front: {gaps}")
        lines.append("95% intervals (Wilson; gains: Newcombe's paired interval); where two "
                     "intervals overlap, these samples do not resolve the difference")
    else:
        lines.append("validation figures only (--no-test): the test split was not read, and "
                     "these figures are measured on the samples that chose them")
    if spec.search.repeats > 1:
        lines.append(f"each figure is the mean over {spec.search.repeats} seeds; sd: its "
                     "standard deviation across them")
    return lines


def _bracket_lines(front) -> list[str]:
    """Each front trial's bracket on the test samples complete verification decided: the
    exact robust accuracy lies between the proved rate and the smaller of proved + undecided
    and the attacked figure (over the whole split; exact when nothing is undecided)."""
    lines = []
    for row in front:
        proved = row.get(TEST_PREFIX + "verified_complete_accuracy")
        if proved is None:
            continue
        undecided = row.get(TEST_PREFIX + "undecided_rate", math.nan)
        attacked = row.get(TEST_PREFIX + "robust_accuracy", math.inf)
        top = min(proved + undecided, attacked)
        exact = (f"exactly {proved:.3f}" if undecided == 0
                 else f"in [{proved:.3f}, {top:.3f}]")
        cell = format_interval(proved, row.get(TEST_PREFIX + "verified_complete_accuracy_ci_low",
                                               math.nan),
                               row.get(TEST_PREFIX + "verified_complete_accuracy_ci_high",
                                       math.nan))
        lines.append(f"complete verification, trial {row['trial_id']} (test, "
                     f"{row.get(TEST_PREFIX + 'verify_samples', math.nan):.0f} samples): proved "
                     f"{cell}, undecided {undecided:.3f}, falsified "
                     f"{row.get(TEST_PREFIX + 'falsified_rate', math.nan):.3f}; robust accuracy "
                     f"{exact}")
    return lines


def list_depths_table(spec) -> str:
    """Every depth of the space's model, in forward order: its path (or built-in name), the
    module's class, the activation's shape and dimension; a module that runs more than once
    per forward, or does not output one tensor, is marked: no LESCI layer can go there."""
    from orchestrator.probes import model_depths, probe_model

    model, shape = probe_model(spec)
    rows = model_depths(spec, model, shape)
    width = max([len("depth"), *(len(r.name) for r in rows)])
    mod_width = max([len("module"), *(len(r.module) for r in rows)])
    lines = [f"depths of {spec.model.label} on {spec.dataset.name} inputs "
             f"{'x'.join(map(str, shape))}:",
             f"{'depth'.ljust(width)}  {'module'.ljust(mod_width)}  {'shape':>16}  "
             f"{'dimension':>10}"]
    for r in rows:
        shape_text = "x".join(map(str, r.shape)) if r.shape is not None else "(not a tensor)"
        note = "" if r.usable or r.shape is None else f"  (runs {r.calls} times per forward)"
        dims = "" if r.dimension is None else f"{r.dimension:,}"
        lines.append(f"{r.name.ljust(width)}  {r.module.ljust(mod_width)}  {shape_text:>16}  "
                     f"{dims:>10}{note}")
    return "\n".join(lines)


def _importable_from_here() -> None:
    """A factory's module may live where search.py is run from: on the path here and, through
    an absolute PYTHONPATH, in every trial (Tune runs trials in folders of their own)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # after the installed packages: a stray optuna.py shadows nothing
    entries = [os.path.abspath(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if e]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*entries, cwd]))


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    """The sweep of ``argv`` (the command line's words, or them already parsed)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    # Unless verbose: Tune's legacy reporter at verbosity 0 prints nothing (its new output
    # engine prints a heading and a TensorBoard hint even then), and MLflow's and Optuna's INFO
    # lines (store creation, migrations, a new study) stay out of the console.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1" if args.verbose else "0")
    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        import optuna  # its own call: optuna sets its logger's level when it first logs

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..."
    try:
        _positive("--num-samples", args.num_samples)
        _positive("--max-concurrent", args.max_concurrent)
        overrides: dict = {}
        if args.num_samples or args.max_concurrent:
            overrides["search"] = {k: v for k, v in (("num_samples", args.num_samples),
                                                     ("max_concurrent", args.max_concurrent))
                                   if v is not None}
        if args.list_depths:  # before the depths are checked: this is how to find them
            spec = load_space(args.space, smoke_test=args.smoke_test, overrides=overrides,
                              check_model=False)
            try:
                log(list_depths_table(spec))
            except ValueError as exc:
                raise SpaceError(f"{args.space}: {exc}") from None
            return 0
        spec = load_space(args.space, smoke_test=args.smoke_test, overrides=overrides,
                          check_data=True)
        if args.resume and not args.name:
            raise SpaceError("--resume: needs --name of the sweep to continue")
        name = args.name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            check_sweep_name(name)
        except ValueError as exc:
            raise SpaceError(f"--name {name!r}: {exc}") from None
        storage = Storage.from_uri(args.storage)
        mlflow_uri = args.mlflow_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        from orchestrator.sweep import SweepInterrupted, run_sweep

        check_tracking_uri(mlflow_uri)
        log(f"sweep {name!r}: space {spec.name!r} ({spec.family}), "
            f"{spec.trial_count} trial(s){spec.defense.describe(spec)}, storage "
            f"{redact(storage.uri)}")
        try:
            result = run_sweep(spec, name, storage, mlflow_uri, resume=args.resume, log=log,
                               verbose=args.verbose, test=not args.no_test)
        except SweepInterrupted as exc:
            print(f"{exc}; continue with: {resume_command(args, name)}", file=sys.stderr)
            return 130
    except TrackingUnavailable as exc:  # an outage, not bad input: --resume once it answers
        print(f"error: {exc}; continue with --resume once it answers", file=sys.stderr)
        return 1
    except (SpaceError, StorageError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        found = tracking_failure(exc)  # raised in a Tune callback: Tune wraps it
        if found is None:
            raise
        print(f"error: {found}; continue with --resume once it answers", file=sys.stderr)
        return 1
    volume = f"hypervolume {result.hypervolume:.4f} (val)" + (
        f", {result.test_hypervolume:.4f} (test)" if result.tested else "")
    log(f"\nPareto front of {spec.name} ({', '.join(f'{m} {d}' for m, d in spec.optimize.items())}"
        f"), {len(result.front)} of {len(result.rows)} "
        f"{spec.defense.unit}, "
        f"{volume}:")
    log(format_front(result, spec))
    ui = (f"mlflow ui --backend-store-uri {mlflow_uri}" if mlflow_uri.startswith("sqlite")
          else f"open {redact(mlflow_uri)}")
    log(f"\nBrowse the runs: {ui}  (experiment {name!r})")
    log(f"Continue after an interruption: {resume_command(args, name)}")
    return 1 if result.failed and not result.rows else 0


def resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues this sweep: the same arguments, with --resume."""
    words = ["python search.py", "--space", args.space, "--name", name, "--resume"]
    for flag, value in (("--num-samples", args.num_samples),
                        ("--max-concurrent", args.max_concurrent),
                        ("--storage", None if args.storage == DEFAULT_STORAGE
                                     else redact(args.storage)),
                        ("--mlflow-uri", args.mlflow_uri and redact(args.mlflow_uri))):
        if value is not None:
            words += [flag, str(value)]
    words += [flag for flag, on in (("--smoke-test", args.smoke_test),
                                    ("--no-test", args.no_test)) if on]
    return " ".join(words)


def entry_point(args: argparse.Namespace | None = None) -> None:
    _importable_from_here()
    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Everything is stored and Ray is stopped: skip the interpreter's teardown of torch's and
    # Ray's modules (about 2 s on two cores), which would only delay the prompt.
    os._exit(code)
