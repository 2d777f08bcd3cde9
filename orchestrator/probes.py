"""Checks of a space that open files or build models: the dataset's files, the checkpoint and one
forward of the model (``check_data``), the model's depths and, for IBP, its bounds
(``check_model``)."""

from __future__ import annotations

import math

from orchestrator.distributions import values_of

__all__ = ["check_data", "check_model", "probe_shape"]

# class counts of the datasets whose shape is known without reading them (a built-in model's
# depths do not depend on them; a factory's last layer may)
_NUM_CLASSES = {"tiny-imagenet": 200}


def check_data(spec) -> None:
    """Open the dataset (every loader checks its files' format; the test split's files must be
    there but are not read: only the final evaluation reads them), the checkpoint, and run the
    model on one batch of the validation split: ``[batch, classes]`` logits."""
    from defenses.data import DeferredDataset
    from defenses.user_models import check_logits
    from orchestrator.lesci_stages import space_model, split_tensors

    try:
        splits = spec.dataset.load()
        if len(splits.val):
            splits.val[0]  # decodes one image: a corrupt file format shows now, not in a trial
        if spec.dataset.name == "folder":  # files of one's own: every header, not just one
            for split in (splits.train, splits.val):
                split.check_files()
        if isinstance(splits.test, DeferredDataset):
            splits.test.check()
    except ValueError as exc:  # DatasetError included
        raise ValueError(f"dataset: {exc}") from None
    if spec.model.mean is not None and len(spec.model.mean) != splits.input_shape[0]:
        raise ValueError(f"model.mean: {len(spec.model.mean)} values for the dataset's "
                         f"{splits.input_shape[0]}-channel images (one per channel)")
    if spec.model.checkpoint:
        _check_checkpoint(spec, splits)
    try:
        model = space_model(spec, splits, weights=True)
    except ValueError as exc:  # CheckpointError, a factory's failure
        where = "model.checkpoint" if spec.model.checkpoint else "model"
        raise ValueError(f"{where}: {exc}") from None
    x, _ = split_tensors(splits.val, 2)
    check_logits(model, x, splits.num_classes, f"model {spec.model.label}")


def _check_checkpoint(spec, splits) -> None:
    """Our own checkpoint holds the space's architecture for the dataset's classes and shape;
    anyone else's weights are checked when they load (key by key)."""
    from defenses.checkpoints import is_our_checkpoint, read_checkpoint

    try:
        payload = read_checkpoint(spec.model.checkpoint)
    except ValueError as exc:  # CheckpointError included
        raise ValueError(f"model.checkpoint: {exc}") from None
    if not is_our_checkpoint(payload):
        return
    built = payload.get("factory") or payload["model"]
    if built != spec.model.label:
        raise ValueError(f"model.checkpoint: {spec.model.checkpoint} holds a {built}, the "
                         f"space's model is {spec.model.label}")
    source = spec.model
    saved = {"options": payload.get("options") or {}}
    wanted = {"options": dict(source.options)}
    if source.factory:  # a built-in model normalises with the dataset's statistics
        saved.update(mean=payload.get("mean"), std=payload.get("std"))
        wanted.update(mean=source.mean, std=source.std)
    for key, value in saved.items():
        if value != wanted[key]:
            raise ValueError(f"model.checkpoint: {source.checkpoint} was saved with {key} "
                             f"{value}, the space gives {wanted[key]}; make them agree")
    if (payload["num_classes"], tuple(payload["input_shape"])) != (splits.num_classes,
                                                                   splits.input_shape):
        raise ValueError(f"model.checkpoint: {spec.model.checkpoint} was built for "
                         f"{payload['num_classes']} classes of {tuple(payload['input_shape'])}"
                         f", the dataset has {splits.num_classes} of {splits.input_shape}")


def probe_shape(spec) -> tuple[tuple[int, int, int], int]:
    """(input shape, class count) of the space's dataset, reading it only where its format does
    not fix them (synthetic, folder, arrays)."""
    from defenses.data import INPUT_SHAPES

    if spec.dataset.name in INPUT_SHAPES:
        return INPUT_SHAPES[spec.dataset.name], _NUM_CLASSES.get(spec.dataset.name, 10)
    try:
        splits = spec.dataset.load()
    except ValueError as exc:
        raise ValueError(f"dataset: {exc}") from None
    return splits.input_shape, splits.num_classes


def probe_model(spec):
    """A model of the space's architecture (random weights) for its dataset's shape."""
    from defenses.models import build_model
    from defenses.user_models import build_user_model

    shape, classes = probe_shape(spec)
    source = spec.model
    if source.mean is not None and len(source.mean) != shape[0]:
        raise ValueError(f"model.mean: {len(source.mean)} values for the dataset's "
                         f"{shape[0]}-channel images (one per channel)")
    try:
        if source.factory:
            return build_user_model(source.factory, source.options, classes, shape,
                                    source.mean, source.std), shape
        # the depths' shapes depend on the input shape only: any normalisation does
        return build_model(source.name, classes, shape, (0.5,) * shape[0],
                           (0.25,) * shape[0], **source.options), shape
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None


def check_model(spec, n_components: tuple[float, float] | None) -> None:
    """The model builds; every LESCI depth is one of its modules, run once per forward, with at
    least the largest n_components dimensions; an IBP model can be bounded."""
    from defenses.capture import list_depths

    model, shape = probe_model(spec)
    if spec.family.value == "ibp":
        from defenses.ibp import check_bounds

        try:
            check_bounds(model, shape)
        except ValueError as exc:
            raise ValueError(f"model {spec.model.label}: {exc}") from None
    if "depth" not in spec.params:
        return
    try:
        depths = {info.name: info for info in list_depths(model, shape)}
    except Exception as exc:  # the forward itself fails: say so before Ray starts
        raise ValueError(f"model {spec.model.label}: the forward of a {list(shape)} batch "
                         f"failed ({type(exc).__name__}: {exc})") from None
    for depth in values_of(spec.params["depth"]):
        info = depths.get(depth)
        if info is None:
            shown = list(depths)[:12]
            raise ValueError(f"params.depth: {depth!r} is not a depth of {spec.model.label}; "
                             f"allowed: {', '.join(shown)}{' ...' if len(depths) > 12 else ''}"
                             " (--list-depths lists them all)")
        if info.shape is None:
            raise ValueError(f"params.depth: {depth!r} ({info.module}) does not output one "
                             "tensor")
        if info.calls != 1:
            raise ValueError(f"params.depth: {depth!r} ({info.module}) runs {info.calls} times "
                             "in one forward (a module used twice); choose a module that runs "
                             "once")
        dims = math.prod(info.shape)
        if n_components and n_components[1] > dims:
            raise ValueError(f"params.n_components: {int(n_components[1])} exceeds the "
                             f"{dims} dimensions of depth {depth!r}")
