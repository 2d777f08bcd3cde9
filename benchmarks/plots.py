"""Figures of the benchmarks; matplotlib stays out of ``defenses``, which computes the numbers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_bound_widths"]


def plot_bound_widths(curves: dict[str, list[tuple[str, float]]], path: str | Path,
                      eps: float) -> None:
    """Plot several models' ``defenses.ibp.layer_bound_widths`` (log scale) into a PNG at
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names: list[str] = []
    for label, widths in curves.items():
        names = [n for n, _ in widths] if len(widths) > len(names) else names
        ax.plot(range(len(widths)), [max(w, 1e-12) for _, w in widths], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean bound width (upper - lower)")
    ax.set_title(f"Interval bound widths per layer, eps = {eps:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
