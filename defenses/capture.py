"""Capture what named depths of a model output during a forward: one forward-hook primitive.

A depth is any module of the model, by its path in ``named_modules()`` (``layer2.1``,
``features.8``); a model may also name some depths itself (``depth_modules()``: the built-in
aliases ``stem``, ``layer1``, ``pool``, ...) and may root the paths at an inner module
(``depth_root``: a user's net inside its normalisation wrapper).

No ``defenses`` import here, so ``defenses.models`` and ``defenses.activations`` can both use it.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["capture", "named_depths", "DepthInfo", "list_depths"]


def named_depths(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Every depth of ``model``: its own names first (``depth_modules()``, if it has them),
    then every module path of ``depth_root`` (the model itself unless it says otherwise)."""
    own = getattr(model, "depth_modules", None)
    named: OrderedDict[str, nn.Module] = OrderedDict(own() if callable(own) else ())
    root = getattr(model, "depth_root", model)
    for path, module in root.named_modules():
        if path:
            named.setdefault(path, module)
    return named


@dataclass(frozen=True)
class DepthInfo:
    """One depth: its name, its module's class, the activation's shape (without the batch;
    None when the module's output is not one tensor) and how often it runs per forward."""

    name: str
    module: str
    shape: tuple[int, ...] | None
    calls: int

    @property
    def dimension(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)

    @property
    def usable(self) -> bool:
        """A LESCI layer can go here: one tensor, produced once per forward."""
        return self.shape is not None and self.calls == 1


@torch.no_grad()
def list_depths(model: nn.Module, input_shape: Sequence[int]) -> list[DepthInfo]:
    """Every depth of ``model`` with its activation shape, from one forward of a zeros batch
    (in eval mode, restored after): the model's own names first, then the module paths in the
    order the forward enters them; modules the forward never runs are left out."""
    depths = named_depths(model)
    own = getattr(model, "depth_modules", None)
    aliases = set(own()) if callable(own) else set()
    seen: dict[int, list] = {}  # id -> [calls, shape, order of first entry]
    handles = []

    def enter(module, _inputs):
        seen.setdefault(id(module), [0, None, len(seen)])

    def leave(module, _inputs, out):
        entry = seen[id(module)]
        entry[0] += 1
        entry[1] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None

    was_training = model.training
    try:
        for module in {id(m): m for m in depths.values()}.values():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        model.eval()
        device = next(iter(model.parameters()), torch.zeros(())).device
        model(torch.zeros((2, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    ran = [(name, module) for name, module in depths.items() if id(module) in seen]
    ordered = ([item for item in ran if item[0] in aliases]
               + sorted((item for item in ran if item[0] not in aliases),
                        key=lambda item: seen[id(item[1])][2]))
    return [DepthInfo(name, type(module).__name__, seen[id(module)][1], seen[id(module)][0])
            for name, module in ordered]


@contextlib.contextmanager
def capture(model: nn.Module, depths: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of the module at each depth (``named_depths``) while in the block.

    Yields ``{depth: [output of each forward of that module, in call order]}`` (the caller may
    clear the lists between forwards); outputs keep their autograd graph. The hooks are removed
    on leaving the block, also on an exception.

    Raises:
        ValueError: a depth the model does not have, listing the first allowed ones.
    """
    modules = named_depths(model)
    depths = list(depths)
    unknown = [depth for depth in depths if depth not in modules]
    if unknown:
        shown = list(modules)[:12]
        raise ValueError(f"unknown depth {unknown[0]!r} for {type(model).__name__}; "
                         f"allowed: {', '.join(shown)}{' ...' if len(modules) > 12 else ''} "
                         "(python search.py --space S --list-depths lists them all)")
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
