"""Model checkpoints: a model made by ``build_model`` or ``build_user_model`` with its build
arguments, as a dict of tensors and plain values loaded with ``weights_only=True``; and other
people's weights (a bare state_dict, ``{"state_dict": ...}`` or ``{"model": ...}``, keys
prefixed ``module.`` or ``model.``) loaded into a given model, with one clear error on any
mismatch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from defenses._io import atomic_write_bytes
from defenses.models import build_model
from defenses.user_models import UserModel, build_user_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "checkpoint_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "load_model",
]

CHECKPOINT_FORMAT = "robust-sweeps-model/1"


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another architecture."""


def checkpoint_bytes(model: nn.Module, extra: dict[str, Any] | None = None) -> bytes:
    """A model made by ``build_model`` or ``build_user_model`` with its build arguments, as
    ``torch.save`` bytes.

    ``extra`` holds plain values (metrics, training config) returned again by load_checkpoint.
    """
    config = getattr(model, "build_config", None)
    if config is None:
        raise ValueError("checkpoints need a model made by build_model or build_user_model")
    payload = {"format": CHECKPOINT_FORMAT, **config, "extra": dict(extra or {}),
               "state_dict": model.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(model: nn.Module, path: str | Path,
                    extra: dict[str, Any] | None = None) -> None:
    """Write ``checkpoint_bytes`` to ``path`` atomically (temp file, then rename)."""
    atomic_write_bytes(path, checkpoint_bytes(model, extra))


def _read(source: str | Path | bytes, name: str | None = None) -> tuple[Any, str]:
    """(payload, name for messages), loaded with weights_only=True."""
    if isinstance(source, bytes):
        name, stream = name or "<checkpoint bytes>", io.BytesIO(source)
    else:
        path = Path(source)
        name = name or str(path)
        if path.is_dir():
            raise CheckpointError(f"{name}: a directory, expected a checkpoint file")
        if not path.is_file():
            raise CheckpointError(f"{name}: no such checkpoint file")
        stream = path.open("rb")
    try:
        with stream:
            return torch.load(stream, map_location="cpu", weights_only=True), name
    except Exception as exc:  # truncated zip, pickle of arbitrary objects, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name}: not a loadable weights-only checkpoint ({reason})") from exc


def _rebuild(payload: dict[str, Any], name: str) -> nn.Module:
    """The model a checkpoint of ours holds, rebuilt as it was saved, with its weights."""
    if payload.get("factory"):
        model = build_user_model(payload["factory"], payload["options"],
                                 payload["num_classes"], payload["input_shape"],
                                 payload["mean"], payload["std"])
    else:
        model = build_model(payload["model"], payload["num_classes"], payload["input_shape"],
                            payload["mean"], payload["std"], **payload["options"])
    _load_state(model, payload["state_dict"], name, payload.get("factory") or payload["model"])
    return model


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu",
                    name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``save_checkpoint`` (a path, or ``checkpoint_bytes``);
    returns (model, extra). A user model's factory must import here."""
    payload, name = _read(source, name)
    if not _is_ours(payload):
        raise CheckpointError(f"{name}: not a checkpoint written by save_checkpoint "
                              "(use load_weights for a bare state_dict)")
    return _rebuild(payload, name).to(map_location), payload["extra"]


def load_model(path: str | Path, fresh: Callable[[], nn.Module]) -> nn.Module:
    """The model of a checkpoint file, read once: a checkpoint of ours rebuilt as it was saved
    (its own normalisation included), anyone else's weights loaded into ``fresh()``."""
    payload, name = _read(path)
    if _is_ours(payload):
        return _rebuild(payload, name)
    return _load_payload(fresh(), payload, name)


def _is_ours(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


_WRAPPERS = ("state_dict", "model")  # {"state_dict": ...} (Lightning & co.), {"model": ...}
_PREFIXES = ("module.", "model.")  # DataParallel / DDP, Lightning modules


def _unwrap(payload: Any) -> Any:
    while isinstance(payload, dict):
        inner = next((payload[key] for key in _WRAPPERS if isinstance(payload.get(key), dict)),
                     None)
        if inner is None:
            return payload
        payload = inner
    return payload


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``model.`` in front of every key while that makes keys match."""
    while not set(state) <= own:
        prefix = next((p for p in _PREFIXES if state and all(k.startswith(p) for k in state)),
                      None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model``: our checkpoints, a bare state_dict (ours, torchvision's,
    anyone's), or the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``, keys prefixed
    ``module.`` or ``model.``). A ``UserModel`` takes the net's own keys; clear error on any
    mismatch."""
    payload, name = _read(path)
    return _load_payload(model, payload, name)


def _load_payload(model: nn.Module, payload: Any, name: str) -> nn.Module:
    if _is_ours(payload):
        state, arch, target = payload["state_dict"], payload.get("factory") or payload[
            "model"], model
    else:
        state, arch = _unwrap(payload), "a bare state_dict"
        target = model.net if isinstance(model, UserModel) else model
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{name}: holds no state_dict of tensors (nor one under "
                              f"{' or '.join(repr(k) for k in _WRAPPERS)})")
    state = _strip_prefixes(state, set(target.state_dict()))
    _load_state(target, state, name, arch)
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape {wrong[:2]}{' ...' if len(wrong) > 2 else ''}")
        raise CheckpointError(f"{name}: checkpoint of {arch} does not fit "
                              f"{type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)
