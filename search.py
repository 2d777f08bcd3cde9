"""Search defense hyperparameters: run ``python search.py --help`` for the options."""

from orchestrator.cli import entry_point

if __name__ == "__main__":
    entry_point()
