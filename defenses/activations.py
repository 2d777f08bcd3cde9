"""Stream the activations at a named depth, batch by batch, never holding the whole set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.capture import capture
from defenses.models import eval_mode

__all__ = ["ActivationBatch", "stream_activations", "batches", "capture"]


@dataclass(frozen=True)
class ActivationBatch:
    """One batch: flattened activations [b, d] (row-major per sample), labels and predictions [b].

    ``inputs`` is kept only when asked for (``keep_inputs=True``), e.g. to attack the same samples.
    """

    activations: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    inputs: torch.Tensor | None = None


def batches(data: Dataset | DataLoader | Iterable, batch_size: int = 256
            ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches from a Dataset (in order, not shuffled) or any batch iterable."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


@torch.no_grad()
def stream_activations(model: nn.Module, depth: str, data: Dataset | DataLoader | Iterable,
                       batch_size: int = 256, device: str | torch.device | None = None,
                       only_correct: bool = False, keep_inputs: bool = False,
                       dtype: torch.dtype = torch.float32, max_samples: int | None = None
                       ) -> Iterator[ActivationBatch]:
    """Yield the activations at ``depth`` for each batch of ``data``, in eval mode.

    Args:
        model: a model of ``defenses.models`` (it lists its named depths).
        depth: a name of ``model.depth_modules()``.
        data: a Dataset (read in order) or an iterable of (images, labels) batches.
        device: where the forward runs and the activations live (default: the model's device).
        only_correct: keep only the samples the model classifies correctly (LESCI's samples).
        keep_inputs: also return the input images of the kept samples.
        max_samples: stop after this many (kept) samples, reading no further batch.

    Memory: one batch of inputs and one of activations at a time.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None), got {max_samples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with capture(model, [depth]) as captured, eval_mode(model):
        outputs, seen = captured[depth], 0
        for images, labels in batches(data, batch_size):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            outputs.clear()
            predictions = model(images).argmax(dim=1)
            if len(outputs) != 1:
                raise RuntimeError(f"depth {depth!r} ran {len(outputs)} times in one forward")
            activations = outputs[0].reshape(images.shape[0], -1).to(dtype)
            if not only_correct and max_samples is None:  # the whole batch: no copy
                seen += len(labels)
                yield ActivationBatch(activations, labels, predictions,
                                      images if keep_inputs else None)
                continue
            keep = (predictions == labels if only_correct
                    else torch.ones_like(labels, dtype=torch.bool))
            if max_samples is not None:  # the first ones, up to max_samples in all
                keep &= keep.cumsum(0) <= max_samples - seen
            if not bool(keep.any()):
                continue
            seen += int(keep.sum())
            yield ActivationBatch(activations[keep], labels[keep], predictions[keep],
                                  images[keep] if keep_inputs else None)
            if max_samples is not None and seen >= max_samples:
                return
