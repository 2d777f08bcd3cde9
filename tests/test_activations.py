"""Streamed activations equal a plain forward, batch by batch."""

import pytest
import torch

from defenses.activations import capture, stream_activations
from defenses.data import ArrayDataset
from defenses.models import build_model

DIGITS = dict(num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))


def manual_resnet_digits(model, x):
    """The named depths of resnet_digits computed by hand."""
    out = {}
    h = model.relu(model.bn1(model.conv1(model.normalize(x))))
    out["stem"] = h
    for name in ("layer1", "layer2", "layer3"):
        h = getattr(model, name)(h)
        out[name] = h
    out["pool"] = torch.flatten(model.avgpool(h), 1)
    return out, model.fc(out["pool"])


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    model = build_model("resnet_digits", **DIGITS).eval()
    x = torch.rand(50, 1, 8, 8)
    y = torch.randint(0, 10, (50,))
    return model, ArrayDataset(x, y)


@pytest.mark.parametrize("depth", ["stem", "layer1", "layer2", "layer3", "pool"])
def test_streamed_activations_equal_plain_forward(model_and_data, depth):
    model, data = model_and_data
    with torch.no_grad():
        expected, logits = manual_resnet_digits(model, data.images)
    batches = list(stream_activations(model, depth, data, batch_size=16))
    assert [b.activations.shape[0] for b in batches] == [16, 16, 16, 2]
    acts = torch.cat([b.activations for b in batches])
    assert torch.allclose(acts, expected[depth].reshape(50, -1), atol=1e-6)
    assert torch.equal(torch.cat([b.predictions for b in batches]), logits.argmax(1))


def test_only_correct_keeps_correct_samples(model_and_data):
    model, data = model_and_data
    with torch.no_grad():
        predictions = model(data.images).argmax(1)
    data.labels[:25] = predictions[:25]  # first half correct by construction
    kept = list(stream_activations(model, "layer2", data, batch_size=10, only_correct=True,
                                   keep_inputs=True))
    labels = torch.cat([b.labels for b in kept])
    assert torch.equal(labels, torch.cat([b.predictions for b in kept]))
    assert len(labels) == int((predictions == data.labels).sum()) >= 25
    assert torch.cat([b.inputs for b in kept]).shape == (len(labels), 1, 8, 8)


def test_streaming_is_lazy(model_and_data):
    model, data = model_and_data
    consumed = []

    def source():
        for i in range(0, 50, 10):
            consumed.append(i)
            yield data.images[i:i + 10], data.labels[i:i + 10]

    stream = stream_activations(model, "stem", source())
    next(stream)
    assert consumed == [0]  # one batch read, not the whole set
    consumed.clear()
    capped = list(stream_activations(model, "stem", source(), max_samples=23))
    assert [b.activations.shape[0] for b in capped] == [10, 10, 3]
    assert consumed == [0, 10, 20]  # no batch read past the cap
    expected = torch.cat([b.activations for b in stream_activations(model, "stem", data)])[:23]
    assert torch.equal(torch.cat([b.activations for b in capped]), expected)


def test_unknown_depth_and_mode_restored(model_and_data):
    model, data = model_and_data
    model.train()
    with pytest.raises(ValueError, match="unknown depth 'layer9'.*allowed: stem, layer1"):
        next(stream_activations(model, "layer9", data))
    list(stream_activations(model, "pool", data))
    assert model.training


def test_capture_records_every_forward_and_keeps_the_graph(model_and_data):
    model, data = model_and_data
    x = data.images[:4].clone().requires_grad_(True)
    with capture(model, ["stem", "pool"]) as outputs:
        model(x)
        model(x[:2])
    assert [o.shape for o in outputs["stem"]] == [(4, 16, 8, 8), (2, 16, 8, 8)]
    assert [o.shape for o in outputs["pool"]] == [(4, 64), (2, 64)]
    expected, _ = manual_resnet_digits(model, x)
    assert torch.allclose(outputs["pool"][0], expected["pool"], atol=1e-6)
    (grad,) = torch.autograd.grad(outputs["pool"][0].sum(), x)  # outputs keep their graph
    assert grad.abs().sum() > 0


def hook_counts(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_removes_its_hooks_even_on_an_exception(model_and_data):
    model, data = model_and_data
    assert hook_counts(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["stem", "layer1", "pool"]):
            assert hook_counts(model) == 3
            raise RuntimeError("boom")
    assert hook_counts(model) == 0
    with pytest.raises(ValueError, match="unknown depth 'layer9'.*allowed: stem, layer1"):
        with capture(model, ["stem", "layer9"]):
            pass
    assert hook_counts(model) == 0
    # a stream abandoned half-way removes its hook too
    stream = stream_activations(model, "stem", data, batch_size=10)
    next(stream)
    assert hook_counts(model) == 1
    stream.close()
    assert hook_counts(model) == 0
