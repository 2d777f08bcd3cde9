"""Named depths and shapes of every model, torchvision compatibility, checkpoints."""

import math
import pickle

import pytest
import torch

from defenses.checkpoints import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from defenses.models import ModelName, build_model, depth_shapes

DIGITS = dict(num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
TINY = dict(num_classes=200, input_shape=(3, 64, 64), mean=(0.48, 0.45, 0.40),
            std=(0.28, 0.27, 0.28))

# (model, build options, dataset) -> expected named depths and their shapes
EXPECTED = [
    ("resnet18", {}, TINY, {"stem": (64, 64, 64), "layer1": (64, 64, 64),
                            "layer2": (128, 32, 32), "layer3": (256, 16, 16),
                            "layer4": (512, 8, 8), "pool": (512,)}),
    ("resnet18", {"stem": "imagenet"}, TINY, {"stem": (64, 16, 16), "layer1": (64, 16, 16),
                                              "layer2": (128, 8, 8), "layer3": (256, 4, 4),
                                              "layer4": (512, 2, 2), "pool": (512,)}),
    ("resnet34", {}, TINY, {"stem": (64, 64, 64), "layer1": (64, 64, 64),
                            "layer2": (128, 32, 32), "layer3": (256, 16, 16),
                            "layer4": (512, 8, 8), "pool": (512,)}),
    ("resnet50", {}, DIGITS, {"stem": (64, 8, 8), "layer1": (256, 8, 8), "layer2": (512, 4, 4),
                              "layer3": (1024, 2, 2), "layer4": (2048, 1, 1), "pool": (2048,)}),
    ("preact_resnet18", {}, DIGITS, {"stem": (64, 8, 8), "layer1": (64, 8, 8),
                                     "layer2": (128, 4, 4), "layer3": (256, 2, 2),
                                     "layer4": (512, 1, 1), "pool": (512,)}),
    ("resnet_digits", {}, DIGITS, {"stem": (16, 8, 8), "layer1": (16, 8, 8),
                                   "layer2": (32, 4, 4), "layer3": (64, 2, 2), "pool": (64,)}),
    ("ibp_small", {}, dict(DIGITS, input_shape=(1, 28, 28)),
     {"conv1": (16, 13, 13), "conv2": (32, 10, 10), "fc1": (100,)}),
    ("ibp_small", {"padding": "same"}, DIGITS, {"conv1": (16, 4, 4), "conv2": (32, 4, 4),
                                                "fc1": (100,)}),
    ("ibp_medium", {}, dict(DIGITS, input_shape=(1, 28, 28)),
     {"conv1": (32, 26, 26), "conv2": (32, 12, 12), "conv3": (64, 10, 10),
      "conv4": (64, 4, 4), "fc1": (512,), "fc2": (512,)}),
    ("ibp_large", {}, dict(DIGITS, input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.2,) * 3),
     {"conv1": (64, 32, 32), "conv2": (64, 32, 32), "conv3": (128, 16, 16),
      "conv4": (128, 16, 16), "conv5": (128, 16, 16), "fc1": (512,)}),
]


@pytest.mark.parametrize("name, options, data, expected", EXPECTED,
                         ids=[f"{e[0]}-{'-'.join(e[1].values()) or 'default'}" for e in EXPECTED])
def test_named_depths_and_shapes(name, options, data, expected):
    model = build_model(name, **data, **options)
    assert dict(depth_shapes(model)) == expected
    out = model(torch.rand(2, *data["input_shape"]))
    assert out.shape == (2, data["num_classes"])


def test_every_model_is_covered():
    assert {e[0] for e in EXPECTED} == {m.value for m in ModelName}


def test_lesci_paper_dimensions_at_64x64():
    dims = {k: math.prod(v) for k, v in depth_shapes(build_model("resnet18", **TINY)).items()}
    assert [dims[k] for k in ("layer1", "layer2", "layer3", "layer4", "pool")] == [
        262_144, 131_072, 65_536, 32_768, 512]


def test_torchvision_parameter_names_and_counts():
    # torchvision's resnet18 / resnet50 have 11,689,512 / 25,557,032 parameters and 122 / 320
    # state_dict entries; the key names below are torchvision's.
    for name, n_params, n_keys in (("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320)):
        model = build_model(name, 1000, (3, 224, 224), (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225))
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert len(model.state_dict()) == n_keys
    keys = set(build_model("resnet18", 1000, (3, 224, 224), (0.5,) * 3, (0.2,) * 3).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.num_batches_tracked",
                "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert key in keys
    assert not any("normalize" in k for k in keys)


def test_normalization_is_the_first_layer():
    model = build_model("ibp_small", **DIGITS, padding="same").eval()
    x = torch.rand(3, 1, 8, 8)
    first = model.layers[1]  # whatever follows normalize (here the SAME padding)
    captured = []
    first.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(x)
    assert torch.allclose(captured[0], (x - 0.3) / 0.4)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model 'vgg16'; allowed: resnet18"):
        build_model("vgg16", **DIGITS)
    with pytest.raises(ValueError, match="takes no option"):
        build_model("resnet_digits", **DIGITS, stem="small")
    with pytest.raises(ValueError, match="use padding='same'"):
        build_model("ibp_small", **DIGITS)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("resnet_digits", **DIGITS)
    with torch.no_grad():
        model.fc.bias.add_(1.5)
    save_checkpoint(model, tmp_path / "m.pt", extra={"val_accuracy": 0.97})
    loaded, extra = load_checkpoint(tmp_path / "m.pt")
    assert extra == {"val_accuracy": 0.97}
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_bare_state_dict_loads_and_mismatch_is_clear(tmp_path):
    src = build_model("resnet18", **TINY)
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    dst = load_weights(build_model("resnet18", **TINY), tmp_path / "tv.pth")
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    with pytest.raises(CheckpointError, match=r"tv.pth: checkpoint of a bare state_dict does not "
                                              r"fit ResNet: missing \['layer1.2.conv1.weight'"):
        load_weights(build_model("resnet34", **TINY), tmp_path / "tv.pth")
    save_checkpoint(build_model("resnet_digits", **DIGITS), tmp_path / "digits.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint of resnet_digits does not fit"):
        load_weights(build_model("resnet18", **DIGITS), tmp_path / "digits.pt")


def test_corrupt_and_hostile_checkpoints(tmp_path):
    save_checkpoint(build_model("resnet_digits", **DIGITS), tmp_path / "m.pt")
    raw = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: not a loadable weights-only checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with (tmp_path / "evil.pt").open("wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
