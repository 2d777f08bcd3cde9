"""Checks of a space that open files or build models: the dataset's files and the
checkpoint (``check_data``), the model's depths and their sizes (``check_depths``)."""

from __future__ import annotations

import math

from orchestrator.distributions import values_of

__all__ = ["check_data", "check_depths"]


def check_data(spec) -> None:
    """Open the dataset (every loader checks its files' format; the test split's files must be
    there but are not read: only the final evaluation reads them) and the checkpoint."""
    from defenses.data import DeferredDataset
    from defenses.checkpoints import load_checkpoint

    try:
        splits = spec.dataset.load()
        if len(splits.val):
            splits.val[0]  # decodes one image: a corrupt file format shows now, not in a trial
        if isinstance(splits.test, DeferredDataset):
            splits.test.check()
    except ValueError as exc:  # DatasetError included
        raise ValueError(f"dataset: {exc}") from None
    if spec.model.checkpoint:
        try:
            model, _ = load_checkpoint(spec.model.checkpoint)
        except ValueError as exc:  # CheckpointError included
            raise ValueError(f"model.checkpoint: {exc}") from None
        built = model.build_config
        if built["model"] != spec.model.name:
            raise ValueError(f"model.checkpoint: {spec.model.checkpoint} holds a "
                             f"{built['model']}, the space's model is {spec.model.name}")
        if (built["num_classes"], tuple(built["input_shape"])) != (splits.num_classes,
                                                                   splits.input_shape):
            raise ValueError(f"model.checkpoint: {spec.model.checkpoint} was built for "
                             f"{built['num_classes']} classes of {tuple(built['input_shape'])}"
                             f", the dataset has {splits.num_classes} of {splits.input_shape}")


def check_depths(spec, n_components: tuple[float, float] | None) -> None:
    """Every LESCI depth is one of the model's, with at least the largest n_components
    dimensions."""
    from defenses.data import INPUT_SHAPES
    from defenses.models import build_model, depth_shapes

    if spec.dataset.name == "synthetic":
        shape = spec.dataset.load().input_shape
    else:
        shape = INPUT_SHAPES[spec.dataset.name]
    # the depths' shapes depend on the input shape only: any class count and normalisation do
    try:
        model = build_model(spec.model.name, 10, shape, (0.5,) * shape[0], (0.25,) * shape[0],
                            **spec.model.options)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    shapes = depth_shapes(model)
    for depth in (values_of(spec.params["depth"]) if "depth" in spec.params else []):
        if depth not in shapes:
            raise ValueError(f"params.depth: {depth!r} is not a depth of {spec.model.name}; "
                             f"allowed: {', '.join(shapes)}")
        dims = math.prod(shapes[depth])
        if n_components and n_components[1] > dims:
            raise ValueError(f"params.n_components: {int(n_components[1])} exceeds the "
                             f"{dims} dimensions of depth {depth!r}")
