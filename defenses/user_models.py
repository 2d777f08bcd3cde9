"""A researcher's own classifier: any ``nn.Module`` made by a factory ``"module:callable"``.

The factory is imported and called with its options (and ``num_classes``, when its signature
names that parameter or takes ``**kwargs``, and the options do not set it). The module it returns maps pixels in
[0, 1] to ``[batch, num_classes]`` logits; when the model expects normalised inputs, the space
gives ``mean`` and ``std`` and a ``Normalize`` layer goes in front of it (``UserModel``).

Every module of the net is a depth, named by its path in the net's own ``named_modules()``
(``layer2.1``, ``features.8``, ``blocks.3.mlp``), whatever wraps it here.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from defenses.models import Normalize

__all__ = ["UserModel", "import_factory", "build_user_model", "check_logits"]


def import_factory(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:callable"`` (``callable`` may be dotted:
    ``module:Class.create``).

    Raises:
        ValueError: a malformed path, a module that does not import (naming why), or a missing
            or non-callable attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory {path!r}: expected 'module:callable' "
                         "(e.g. my_models.nets:make_net)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"factory {path!r}: cannot import {module_name!r} ({exc}); it must be "
                         "importable on every node: install it, or put its folder on "
                         "PYTHONPATH") from None
    except Exception as exc:  # the module's own code failed while importing
        raise ValueError(f"factory {path!r}: importing {module_name!r} failed "
                         f"({type(exc).__name__}: {exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"factory {path!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"factory {path!r}: {attr!r} is not callable")
    return target


def _takes_num_classes(factory: Callable[..., Any]) -> bool:
    """The factory names a ``num_classes`` parameter, or passes ``**kwargs`` on (torchvision's
    and timm's model functions: ``resnet18(*, weights=None, progress=True, **kwargs)``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return "num_classes" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class UserModel(nn.Module):
    """A user's net with its input normalisation: ``net(normalize(x))`` on pixels in [0, 1].

    ``normalize`` is the identity when the space gives no mean/std (the net takes pixels).
    Depths are the paths of ``net.named_modules()`` (``depth_root``)."""

    def __init__(self, net: nn.Module, input_shape: Sequence[int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together: give both or neither")
        self.normalize = nn.Identity() if mean is None else Normalize(mean, std)
        self.net = net
        self.input_shape = tuple(int(v) for v in input_shape)

    @property
    def depth_root(self) -> nn.Module:
        return self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_user_model(factory: str, options: dict[str, Any], num_classes: int,
                     input_shape: Sequence[int], mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> UserModel:
    """Call ``factory`` with ``options`` (plus ``num_classes`` when it takes it and the
    options do not set it) and wrap the module it returns.

    Raises:
        ValueError: the factory does not import, fails, or returns something other than an
            ``nn.Module``; naming the factory.
    """
    make = import_factory(factory)
    kwargs = dict(options)
    if "num_classes" not in kwargs and _takes_num_classes(make):
        kwargs["num_classes"] = int(num_classes)
    try:
        net = make(**kwargs)
    except Exception as exc:
        raise ValueError(f"factory {factory!r} with options {dict(options)} failed "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"factory {factory!r} returned a {type(net).__name__}, expected a "
                         "torch.nn.Module")
    model = UserModel(net, input_shape, mean, std)
    # what save_checkpoint stores, so load_checkpoint rebuilds the same net
    model.build_config = {"factory": factory, "options": dict(options),
                          "num_classes": int(num_classes),
                          "input_shape": list(model.input_shape),
                          "mean": None if mean is None else [float(v) for v in mean],
                          "std": None if std is None else [float(v) for v in std]}
    return model


@torch.no_grad()
def check_logits(model: nn.Module, x: torch.Tensor, num_classes: int, what: str) -> None:
    """``model`` maps the batch ``x`` of pixels to finite ``[batch, num_classes]`` logits (in
    eval mode, restored after); ``ValueError`` naming ``what`` otherwise."""
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise ValueError(f"{what}: the forward of a batch of shape {list(x.shape)} failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{what}: returns a {type(out).__name__}, expected a tensor of logits "
                         f"[batch, {num_classes}]")
    if tuple(out.shape) != (x.shape[0], num_classes):
        raise ValueError(f"{what}: returns logits of shape {list(out.shape)} for a batch of "
                         f"{x.shape[0]}, expected [{x.shape[0]}, {num_classes}] (the dataset's "
                         "classes)")
    if not torch.isfinite(out).all():
        raise ValueError(f"{what}: returns non-finite logits")
