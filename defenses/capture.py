"""Capture what named depths of a model output during a forward: one forward-hook primitive.

No ``defenses`` import here, so ``defenses.models`` and ``defenses.activations`` can both use it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["capture"]


@contextlib.contextmanager
def capture(model: nn.Module, depths: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of ``model.depth_modules()[depth]`` for each depth while in the block.

    Yields ``{depth: [output of each forward of that module, in call order]}`` (the caller may
    clear the lists between forwards); outputs keep their autograd graph. The hooks are removed
    on leaving the block, also on an exception.

    Raises:
        ValueError: a depth the model does not name, listing the allowed ones.
    """
    modules = model.depth_modules()
    depths = list(depths)
    unknown = [depth for depth in depths if depth not in modules]
    if unknown:
        raise ValueError(f"unknown depth {unknown[0]!r} for {type(model).__name__}; "
                         f"allowed: {', '.join(modules)}")
    outputs: dict[str, list[torch.Tensor]] = {depth: [] for depth in depths}
    handles = []
    try:
        for depth in depths:
            handles.append(modules[depth].register_forward_hook(
                lambda _module, _inputs, out, into=outputs[depth]: into.append(out)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
