"""The search spaces shipped with the package (``search_spaces/*.yaml``)."""

from importlib import resources
from pathlib import Path

__all__ = ["shipped_spaces"]


def shipped_spaces() -> dict[str, Path]:
    """The spaces shipped with the package, by name."""
    folder = resources.files("search_spaces")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}
