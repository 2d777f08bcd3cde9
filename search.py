"""Search defense hyperparameters: run ``python search.py --help`` for the options."""

from orchestrator.arguments import parse_args

if __name__ == "__main__":
    arguments = parse_args(None)  # --help and bad flags answer before the heavy imports
    from orchestrator.cli import entry_point

    entry_point(arguments)
