"""A researcher's own model: built by a factory from a package that is not this project's, its
weights from other people's checkpoint formats, LESCI at any of its module paths, and every bad
input refused before Ray starts (one line, exit code 2)."""

from pathlib import Path

import pytest
import torch

from defenses.capture import capture, list_depths, named_depths
from defenses.checkpoints import (CheckpointError, load_checkpoint, load_weights,
                                  save_checkpoint)
from defenses.models import build_model
from defenses.user_models import UserModel, build_user_model, check_logits, import_factory
from orchestrator.cli import main
from orchestrator.loading import load_space
from tests.own_package import import_package

FACTORY = "labnets.nets:make_net"


@pytest.fixture()
def nets(tmp_path):
    return import_package(tmp_path / "pkg")


def test_factory_gets_options_and_the_dataset_class_count(nets):
    model = build_user_model(FACTORY, {"width": 4}, 7, (1, 8, 8))
    assert isinstance(model, UserModel) and isinstance(model.net, nets.TinyNet)
    assert model.net.features[0][0].out_channels == 4
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 7)
    # options win over the class count
    assert build_user_model(FACTORY, {"num_classes": 5}, 7, (1, 8, 8))(
        torch.rand(2, 1, 8, 8)).shape == (2, 5)


def test_mean_and_std_normalise_before_the_net(nets):
    model = build_user_model(FACTORY, {}, 3, (1, 8, 8), mean=[0.5], std=[0.25]).eval()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model(x), model.net((x - 0.5) / 0.25))
    plain = build_user_model(FACTORY, {}, 3, (1, 8, 8)).eval()
    plain.net.load_state_dict(model.net.state_dict())
    assert torch.allclose(plain(x), plain.net(x))  # no mean/std: the net takes pixels


@pytest.mark.parametrize("path, message", [
    ("labnets.nets", "expected 'module:callable'"),
    ("labnets.missing:make_net", "cannot import 'labnets.missing'"),
    ("labnets.nets:nothing", "has no attribute 'nothing'"),
    ("labnets.nets:torch", "is not callable"),
])
def test_a_factory_that_does_not_resolve_is_named(nets, path, message):
    with pytest.raises(ValueError, match=message):
        import_factory(path)


def test_a_factory_that_returns_no_module_or_wrong_logits_is_refused(nets):
    with pytest.raises(ValueError, match="returned a str, expected a torch.nn.Module"):
        build_user_model("labnets.nets:not_a_module", {}, 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"failed \(TypeError"):
        build_user_model(FACTORY, {"depth": 3}, 10, (1, 8, 8))
    wrong = build_user_model("labnets.nets:wrong_output", {}, 10, (1, 8, 8))
    with pytest.raises(ValueError, match=r"logits of shape \[2, 3\].*expected \[2, 10\]"):
        check_logits(wrong, torch.rand(2, 1, 8, 8), 10, "model x")


def test_every_module_path_of_the_net_is_a_depth(nets):
    model = build_user_model(FACTORY, {}, 10, (1, 8, 8))
    depths = named_depths(model)
    assert {"features.0", "features.1", "features.1.body.2", "features.2.1", "head.3"} <= set(
        depths)
    assert not any(name.startswith("net.") for name in depths)  # the net's own paths
    with capture(model, ["features.1.body.2", "features.2"]) as out:
        model(torch.rand(3, 1, 8, 8))
    assert out["features.1.body.2"][0].shape == (3, 8, 8, 8)
    assert out["features.2"][0].shape == (3, 16, 4, 4)
    info = {d.name: d for d in list_depths(model, (1, 8, 8))}
    assert info["features.2"].shape == (16, 4, 4) and info["features.2"].dimension == 256
    assert info["features.1"].usable


def test_builtin_models_keep_their_names_and_gain_module_paths():
    model = build_model("resnet_digits", 10, (1, 8, 8), (0.3,), (0.4,))
    info = {d.name: d for d in list_depths(model, (1, 8, 8))}
    assert list(info)[:5] == ["stem", "layer1", "layer2", "layer3", "pool"]
    assert info["layer2.0.conv2"].shape == (32, 4, 4)
    # one ReLU module applied twice in a block: listed, but no LESCI layer can go there
    assert info["layer1.0.relu"].calls == 2 and not info["layer1.0.relu"].usable


def _state(nets, **kw):
    torch.manual_seed(0)
    return nets.make_net(10, **kw).state_dict()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix",
                                  "lightning"])
def test_other_peoples_checkpoint_formats_load(nets, tmp_path, wrap):
    state = _state(nets)
    payload = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": torch.tensor(0.1)}},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
    }[wrap]
    torch.save(payload, tmp_path / "w.pt")
    model = load_weights(build_user_model(FACTORY, {}, 10, (1, 8, 8)), tmp_path / "w.pt")
    for key, value in state.items():
        assert torch.equal(model.net.state_dict()[key], value)


def test_a_checkpoint_of_another_net_is_refused_naming_the_keys(nets, tmp_path):
    torch.save(_state(nets, width=4), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: .*does not fit TinyNet: shape"):
        load_weights(build_user_model(FACTORY, {}, 10, (1, 8, 8)), tmp_path / "w.pt")
    torch.save({"epoch": 3}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict of tensors"):
        load_weights(build_user_model(FACTORY, {}, 10, (1, 8, 8)), tmp_path / "e.pt")


def test_a_user_model_checkpoint_rebuilds_from_its_factory(nets, tmp_path):
    model = build_user_model(FACTORY, {"width": 4}, 10, (1, 8, 8), [0.5], [0.2]).eval()
    save_checkpoint(model, tmp_path / "c.pt", {"note": 1})
    again, extra = load_checkpoint(tmp_path / "c.pt")
    x = torch.rand(2, 1, 8, 8)
    assert extra == {"note": 1} and torch.equal(again.eval()(x), model(x))


# ------------------------------------------------------------------------------------------
# the space and the CLI


def _space(tmp_path, model: str, family: str = "lesci", depth: str = "[features.1, features.2]",
           extra: str = "") -> str:
    if family == "lesci":
        params = f"params: {{depth: {{choice: {depth}}}, n_components: 4, k: [3]}}"
        rest = "optimize: {accuracy: max, projection_rate: max}"
    else:
        params = ("params: {eps: 0.1, objective: pgd}" if family == "adversarial"
                  else "params: {eps_train: 0.1}")
        rest = "attack: {eps: 0.1}\noptimize: {nominal_accuracy: max}"
    path = tmp_path / "space.yaml"
    path.write_text("\n".join([f"name: own\nfamily: {family}\ndataset: {{name: digits}}",
                               f"model: {model}", "training: {epochs: 1}", params, rest,
                               extra, ""]))
    return str(path)


def test_a_space_with_a_factory_and_nested_depths_validates(nets, tmp_path):
    spec = load_space(_space(tmp_path, f"{{factory: '{FACTORY}', options: {{width: 4}}}}"),
                      check_data=True)
    assert spec.model.label == FACTORY


@pytest.mark.parametrize("model, depth, family, message", [
    ("{name: resnet_digits, factory: 'labnets.nets:make_net'}", None, "lesci",
     "give either name .* or factory"),
    ("{options: {}}", None, "lesci", "not neither"),
    ("{name: resnet_digits, mean: [0.5], std: [0.2]}", None, "lesci",
     "mean/std: only for a factory"),
    ("{factory: 'labnets.nets:make_net', mean: [0.5]}", None, "lesci",
     "mean and std go together"),
    ("{factory: 'labnets.nets:make_net', mean: [0.5], std: [0.0]}", None, "lesci",
     "must be positive"),
    ("{factory: 'labnets.nope:make_net'}", None, "lesci", "cannot import 'labnets.nope'"),
    ("{factory: 'labnets.nets:make_net'}", "[features.9]", "lesci",
     "'features.9' is not a depth of labnets.nets:make_net; allowed: features, features.0"),
    ("{factory: 'labnets.nets:make_net'}", "[features.1.body.2, head.3]", "lesci",
     "n_components: 4 exceeds"),
    ("{factory: 'labnets.nets:wrong_output'}", None, "lesci",
     r"logits of shape \[2, 3\]"),
    ("{factory: 'labnets.nets:untraceable'}", None, "ibp", "cannot trace Untraceable"),
    ("{factory: 'labnets.nets:squared'}", None, "ibp",
     r"no rule for call_function torch\.mul: of two intervals .* at node 'mul'"),
    ("{factory: 'labnets.nets:make_net', mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}", None,
     "lesci", r"model.mean: 3 values for the dataset's 1-channel images"),
])
def test_bad_models_are_exit_2_with_one_line_and_nothing_stored(nets, tmp_path, capsys, model,
                                                                 depth, family, message):
    if "head.3" in (depth or ""):  # 10 logits, fewer than n_components
        space = _space(tmp_path, model, depth=depth)
        Path(space).write_text(Path(space).read_text().replace("n_components: 4",
                                                               "n_components: 12"))
        message = "n_components: 12 exceeds the 10 dimensions of depth 'head.3'"
    else:
        space = _space(tmp_path, model, family, **({"depth": depth} if depth else {}))
    code = main(["--space", space, "--storage", str(tmp_path / "sweeps"),
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_checkpoint_that_does_not_fit_the_factory_is_exit_2(nets, tmp_path, capsys):
    torch.save({"state_dict": _state(nets, width=4)}, tmp_path / "w.pt")
    space = _space(tmp_path, f"{{factory: '{FACTORY}', checkpoint: {tmp_path / 'w.pt'}}}")
    assert main(["--space", space, "--storage", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.checkpoint:" in err and "does not fit" in err


def test_list_depths_prints_every_module_path_with_its_shape(nets, tmp_path, capsys):
    # a wrong depth in the space does not stop the listing: it is how to find the right ones
    space = _space(tmp_path, f"{{factory: '{FACTORY}'}}", depth="[nowhere]")
    assert main(["--space", space, "--list-depths"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["features.1.body.2"][1:] == ["ReLU", "8x8x8", "512"]
    assert rows["features.2"][1:] == ["Sequential", "16x4x4", "256"]
    assert rows["head.3"][1:] == ["Linear", "10", "10"]
    builtin = _space(tmp_path, "{name: resnet_digits}", depth="[stem]")
    assert main(["--space", builtin, "--list-depths"]) == 0
    out = capsys.readouterr().out
    assert "stem " in out and "layer1.0.conv1 " in out and "(runs 2 times per forward)" in out


def _bad_folder(tmp_path):
    (tmp_path / "imgs" / "test" / "a").mkdir(parents=True)  # no train/
    return "{name: folder, root: imgs}", "imgs"


def _bad_arrays(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x_train=np.zeros((20, 8, 8), np.uint8),
             y_train=np.zeros(19, np.int64), x_test=np.zeros((4, 8, 8), np.uint8),
             y_test=np.zeros(4, np.int64))
    return "{name: arrays, path: d.npz}", "y_train"


def _undecodable(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        for split in ("train", "test"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("L", (8, 8), i * 20).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "train" / "a" / "0.png").write_bytes(b"not a png")
    return "{name: folder, root: imgs}", "0.png"


def _images(tmp_path, sizes=None):
    from PIL import Image

    for label in ("a", "b"):
        for split in ("train", "test"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(8):
                Image.new("L", (sizes or {}).get((split, label, i), (8, 8)), i * 20).save(
                    folder / f"{i}.png")


def _late_undecodable(tmp_path):
    # not the first image, nor (with 32 files) necessarily one the statistics sample reads
    _images(tmp_path)
    (tmp_path / "imgs" / "train" / "b" / "7.png").write_bytes(b"\x89PNG garbage")
    return "{name: folder, root: imgs}", "7.png"


def _mixed_sizes(tmp_path):
    _images(tmp_path, {("train", "b", 5): (9, 8)})
    return "{name: folder, root: imgs}", "5.png"


def _empty_class(tmp_path):
    _images(tmp_path)
    (tmp_path / "imgs" / "train" / "c").mkdir()
    return "{name: folder, root: imgs}", "c"


def _arrays_with(tmp_path, **bad):
    import numpy as np

    arrays = dict(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 2,
                  x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.zeros(4, np.int64))
    arrays.update(bad)
    np.savez(tmp_path / "d.npz", **arrays)
    return "{name: arrays, path: d.npz}", next(iter(bad))


def _negative_labels(tmp_path):
    import numpy as np

    return _arrays_with(tmp_path, y_train=np.array([-1] + [0, 1] * 9 + [0]))


def _wrong_dtype(tmp_path):
    import numpy as np

    return _arrays_with(tmp_path, x_train=np.zeros((20, 8, 8), np.int32))


def _wrong_shape(tmp_path):
    import numpy as np

    return _arrays_with(tmp_path, x_train=np.zeros((20, 8, 8, 5), np.uint8))


@pytest.mark.parametrize("make", [_bad_folder, _bad_arrays, _undecodable, _late_undecodable,
                                  _mixed_sizes, _empty_class, _negative_labels, _wrong_dtype,
                                  _wrong_shape])
def test_bad_data_is_exit_2_naming_the_file_or_key(nets, tmp_path, capsys, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    dataset, named = make(tmp_path)
    space = _space(tmp_path, f"{{factory: '{FACTORY}'}}")
    Path(space).write_text(Path(space).read_text().replace("dataset: {name: digits}",
                                                           f"dataset: {dataset}"))
    assert main(["--space", space, "--storage", str(tmp_path / "sweeps"),
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "dataset" in err, err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_checkpoint_of_ours_saved_with_other_options_is_exit_2(nets, tmp_path, capsys):
    model = build_user_model(FACTORY, {"width": 4}, 10, (1, 8, 8))
    save_checkpoint(model, tmp_path / "c.pt")
    space = _space(tmp_path, f"{{factory: '{FACTORY}', options: {{width: 8}}, "
                             f"checkpoint: {tmp_path / 'c.pt'}}}")
    assert main(["--space", space, "--storage", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert "was saved with options {'width': 4}, the space gives {'width': 8}" in err


def test_torchvision_style_factories_get_the_class_count(nets):
    # torchvision's and timm's model functions take num_classes through **kwargs
    def resnet_like(*, weights=None, progress=True, **kwargs):
        return nets.make_net(**kwargs)

    nets.resnet_like = resnet_like
    model = build_user_model("labnets.nets:resnet_like", {}, 6, (1, 8, 8))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 6)
