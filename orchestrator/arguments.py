"""``search.py``'s command line, kept free of heavy imports so that ``--help`` and a bad flag
answer at once (torch, Ray, MLflow and Optuna load only once a sweep runs)."""

from __future__ import annotations

import argparse

from search_spaces import shipped_spaces

__all__ = ["DEFAULT_STORAGE", "parse_args"]

DEFAULT_STORAGE = "sweeps"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shipped = ", ".join(sorted(shipped_spaces()))
    parser = argparse.ArgumentParser(
        prog="search.py",
        description="Search defense hyperparameters (LESCI, IBP, adversarial training) with "
                    "Ray Tune and Optuna, tracked in MLflow. With no arguments: the embedded "
                    "LESCI demo on scikit-learn's digits.")
    parser.add_argument("--space", default="demo",
                        help=f"a shipped space ({shipped}) or a YAML file (default: demo)")
    parser.add_argument("--name", help="sweep name: MLflow experiment and storage folder "
                                       "(default: the space's name and the start time)")
    parser.add_argument("--num-samples", type=int,
                        help="the space's search.num_samples: trials drawn (of each grid point, "
                             "each objective of a grid) (overrides the space)")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials at once (overrides the space)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="local folder or s3://bucket/prefix for sweep state, checkpoints "
                             "and shared stages (default: ./sweeps)")
    parser.add_argument("--mlflow-uri",
                        help="MLflow tracking URI (default: sqlite:///mlflow.db in the working "
                             "directory)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep --name after a crash, Ctrl-C or lost head node")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny and fast: the space's smoke_test overrides")
    parser.add_argument("--no-test", action="store_true",
                        help="do not evaluate the front on the test split after the search "
                             "(no test_* figures)")
    parser.add_argument("--list-depths", action="store_true",
                        help="print every module path of the space's model (a LESCI depth) "
                             "with its activation shape and dimension, and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray Tune's trial tables, Ray's and MLflow's logs and "
                             "the trials' own output")
    return parser.parse_args(argv)
