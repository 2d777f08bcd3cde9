"""Checks of a space that open files or build models, run once before Ray starts: the dataset's
files (``open_dataset``), the model with its checkpoint and one forward of a validation batch
(``check_data``), the model's depths and, for IBP, its bounds (``check_model``)."""

from __future__ import annotations



__all__ = ["open_dataset", "check_data", "check_model", "probe_model", "model_depths"]

# class counts of the datasets whose shape is known without reading them (a built-in model's
# depths do not depend on them; a factory's last layer may)
_NUM_CLASSES = {"tiny-imagenet": 200}


def open_dataset(spec):
    """The space's splits, checked: every loader checks its files' format, one validation image
    is decoded, a folder dataset's train and val headers are all read; the test split's files
    must be there but are not read (only the final evaluation reads them)."""
    from defenses.data import DeferredDataset

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
    return splits


def _check_mean(spec, channels: int) -> None:
    if spec.model.mean is not None and len(spec.model.mean) != channels:
        raise ValueError(f"model.mean: {len(spec.model.mean)} values for the dataset's "
                         f"{channels}-channel images (one per channel)")


def check_data(spec, splits) -> None:
    """The model with its checkpoint's weights (the file read once) is the space's, and maps
    a validation batch to ``[batch, classes]`` logits."""
    from defenses.user_models import check_logits
    from orchestrator.lesci_stages import space_model, split_tensors

    _check_mean(spec, splits.input_shape[0])
    try:
        model = space_model(spec, splits, weights=True)
    except ValueError as exc:  # CheckpointError, a factory's failure
        where = "model.checkpoint" if spec.model.checkpoint else "model"
        raise ValueError(f"{where}: {exc}") from None
    if spec.model.checkpoint:
        _check_built(spec, splits, model.build_config)
    x, _ = split_tensors(splits.val, 2)
    check_logits(model, x, splits.num_classes, f"model {spec.model.label}")
    spec.defense.check_data(spec, splits)


def _check_built(spec, splits, built: dict) -> None:
    """A checkpoint of ours is rebuilt as it was saved: it must be the space's model (its
    architecture, options and, for a factory, normalisation) for the dataset's classes and
    shape. Anyone else's weights load into the space's model, key by key."""
    source = spec.model
    label = built.get("factory") or built["model"]
    if label != source.label:
        raise ValueError(f"model.checkpoint: {source.checkpoint} holds a {label}, the "
                         f"space's model is {source.label}")
    saved = {"options": built.get("options") or {}}
    wanted = {"options": dict(source.options)}
    if source.factory:  # a built-in model normalises with the dataset's statistics
        saved.update(mean=built.get("mean"), std=built.get("std"))
        wanted.update(mean=source.mean, std=source.std)
    for key, value in saved.items():
        if value != wanted[key]:
            raise ValueError(f"model.checkpoint: {source.checkpoint} was saved with {key} "
                             f"{value}, the space gives {wanted[key]}; make them agree")
    if (built["num_classes"], tuple(built["input_shape"])) != (splits.num_classes,
                                                               splits.input_shape):
        raise ValueError(f"model.checkpoint: {source.checkpoint} was built for "
                         f"{built['num_classes']} classes of {tuple(built['input_shape'])}"
                         f", the dataset has {splits.num_classes} of {splits.input_shape}")


def probe_model(spec, splits=None):
    """(a model of the space's architecture with random weights, its input shape), for the
    dataset's shape: from ``splits`` when given, else read only where the dataset's format does
    not fix it (synthetic, folder, arrays)."""
    from defenses.data import INPUT_SHAPES

    if splits is None and spec.dataset.name in INPUT_SHAPES:
        shape = INPUT_SHAPES[spec.dataset.name]
        classes = _NUM_CLASSES.get(spec.dataset.name, 10)
    else:
        splits = splits or open_dataset(spec)
        shape, classes = splits.input_shape, splits.num_classes
    _check_mean(spec, shape[0])
    try:
        # the depths' shapes depend on the input shape only: any normalisation does
        return spec.model.build(classes, shape, (0.5,) * shape[0], (0.25,) * shape[0]), shape
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None


def model_depths(spec, model, shape) -> list:
    """``defenses.capture.list_depths`` of the model, a failing forward as one ValueError."""
    from defenses.capture import list_depths

    try:
        return list_depths(model, shape)
    except Exception as exc:  # the model's own forward fails: say so before Ray starts
        raise ValueError(f"model {spec.model.label}: the forward of a {list(shape)} batch "
                         f"failed ({type(exc).__name__}: {exc})") from None


def check_model(spec, splits=None) -> None:
    """The model builds, and its family can use it (``DefenseFamily.check_model``: a LESCI
    depth is one of its modules, an IBP model can be bounded)."""
    model, shape = probe_model(spec, splits)
    spec.defense.check_model(spec, model, shape)
