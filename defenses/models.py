"""Classifiers with named depths: the places a LESCI layer can go.

Models take pixel inputs in [0, 1]; normalisation is their first layer (``Normalize``), whose
mean/std are not part of the state_dict, so the ResNets keep torchvision's parameter names and a
torchvision ``resnet18().state_dict()`` loads into ``resnet18(stem="imagenet")`` unchanged.
ReLUs are never in-place: captured activations and interval bounds stay valid after the forward.

Every model is a plain ``nn.Module`` with its own ``forward`` (as torchvision's ``resnet.py``);
``defenses.ibp`` bounds it by interpreting the ``torch.fx`` graph of that forward, so forward and
bounds cannot drift apart.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from defenses.capture import capture

__all__ = [
    "ModelName",
    "Normalize",
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "ResNet",
    "PreActResNet",
    "IBPCNN",
    "build_model",
    "depth_shapes",
    "eval_mode",
]


class ModelName(str, enum.Enum):
    RESNET18 = "resnet18"
    RESNET34 = "resnet34"
    RESNET50 = "resnet50"
    PREACT_RESNET18 = "preact_resnet18"
    RESNET_DIGITS = "resnet_digits"
    IBP_SMALL = "ibp_small"
    IBP_MEDIUM = "ibp_medium"
    IBP_LARGE = "ibp_large"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its previous mode restored after (even on an
    exception): batch norm uses its running statistics while a defense is evaluated or
    attacked."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Normalize(nn.Module):
    """(x - mean) / std per channel; an affine layer, so attacks and IBP stay in pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels, std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        # Not persistent: keeps state_dicts torchvision-compatible; the config carries them.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DepthsMixin:
    """Models list their named depths: name -> module whose output is the activation there."""

    input_shape: tuple[int, int, int]

    def depth_modules(self) -> "OrderedDict[str, nn.Module]":
        raise NotImplementedError

    @property
    def depth_names(self) -> list[str]:
        return list(self.depth_modules())


class _ResidualDepths(DepthsMixin):
    """Depths of the residual nets: ``stem``, ``layer1`` .. ``layerN``, ``pool``."""

    num_layers: int
    flatten: nn.Module

    def _stem(self) -> nn.Module:
        raise NotImplementedError

    def layers(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_layers)]

    def depth_modules(self) -> "OrderedDict[str, nn.Module]":
        named: OrderedDict[str, nn.Module] = OrderedDict(stem=self._stem())
        for i, layer in enumerate(self.layers()):
            named[f"layer{i + 1}"] = layer
        named["pool"] = self.flatten
        return named


class ResNet(_ResidualDepths, nn.Module):
    """ResNet with torchvision parameter names.

    stem="imagenet": 7x7/2 convolution and 3x3/2 max pool (torchvision). stem="small": 3x3/1
    convolution, no pool (CIFAR, Tiny ImageNet, digits), so at 64x64 inputs the first depths are
    64 x 64 x 64 = 262,144-dimensional.

    Named depths: ``stem``, ``layer1`` .. ``layerN``, ``pool`` (the pooled features).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int, input_shape: tuple[int, int, int],
                 mean: Sequence[float], std: Sequence[float], stem: str = "imagenet",
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must pair up")
        self.input_shape = tuple(input_shape)
        self.normalize = Normalize(mean, std)
        c = input_shape[0]
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(c, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.num_layers = len(layers)
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, blocks, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for layer in self.layers():
            x = layer(x)
        return self.fc(self.flatten(self.avgpool(x)))

    def _stem(self) -> nn.Module:
        return self.maxpool  # the identity with the small stem


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings")."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = (conv1x1(cin, planes, stride) if stride != 1 or cin != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        # A projection shortcut starts after the shared pre-activation, the identity before it.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class PreActResNet(_ResidualDepths, nn.Module):
    """Pre-activation ResNet-18 with a 3x3 stem (the adversarial-training workhorse on CIFAR)."""

    def __init__(self, layers: Sequence[int], num_classes: int, input_shape: tuple[int, int, int],
                 mean: Sequence[float], std: Sequence[float],
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.normalize = Normalize(mean, std)
        self.conv1 = conv3x3(input_shape[0], widths[0])
        cin = widths[0]
        self.num_layers = len(layers)
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            seq = []
            for j in range(blocks):
                seq.append(PreActBlock(cin, width, stride if j == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*seq))
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        for layer in self.layers():
            x = layer(x)
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))

    def _stem(self) -> nn.Module:
        return self.conv1


# The IBP paper's CNNs (Gowal et al. 2018): (kernel, channels, stride) convs
# then hidden fully-connected widths. Padding as in the authors' code: VALID for small/medium,
# SAME for large; "same" is available for inputs too small for VALID (8x8 digits).
_IBP_ARCHS: dict[str, tuple[list[tuple[int, int, int]], list[int], str]] = {
    "ibp_small": ([(4, 16, 2), (4, 32, 1)], [100], "valid"),
    "ibp_medium": ([(3, 32, 1), (4, 32, 2), (3, 64, 1), (4, 64, 2)], [512, 512], "valid"),
    "ibp_large": ([(3, 64, 1), (3, 64, 1), (3, 128, 2), (3, 128, 1), (3, 128, 1)], [512], "same"),
}


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class IBPCNN(DepthsMixin, nn.Module):
    """The small / medium / large CNNs of the IBP paper, as one ``nn.Sequential`` (``layers``).

    Named depths: ``conv1`` .. ``convN`` and ``fc1`` .. ``fcM`` (each after its ReLU). With
    ``batch_norm``, a batch norm after every convolution and hidden linear layer, before its
    ReLU (``bn_conv1``, ``bn_fc1``, ...), as Shi et al. 2021 (section 3.2) add them for IBP
    training.
    """

    def __init__(self, arch: str, num_classes: int, input_shape: tuple[int, int, int],
                 mean: Sequence[float], std: Sequence[float], padding: str | None = None,
                 batch_norm: bool = False):
        super().__init__()
        if arch not in _IBP_ARCHS:
            raise ValueError(f"unknown IBP architecture {arch!r}; allowed: {sorted(_IBP_ARCHS)}")
        convs, hidden, default_padding = _IBP_ARCHS[arch]
        padding = padding or default_padding
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        mods: list[tuple[str, nn.Module]] = [("normalize", Normalize(mean, std))]
        self._depths: list[tuple[str, str]] = []
        for i, (k, cout, s) in enumerate(convs, start=1):
            if padding == "same":
                (pt, pb), (pl, pr) = _same_padding(h, k, s), _same_padding(w, k, s)
                if pt or pb or pl or pr:
                    mods.append((f"pad{i}", nn.ZeroPad2d((pl, pr, pt, pb))))
                h, w = h + pt + pb, w + pl + pr
            h, w = (h - k) // s + 1, (w - k) // s + 1
            if h < 1 or w < 1:
                raise ValueError(f"{arch} with {padding!r} padding does not fit inputs "
                                 f"{tuple(input_shape)}; use padding='same'")
            mods.append((f"conv{i}", nn.Conv2d(c, cout, k, stride=s)))
            if batch_norm:
                mods.append((f"bn_conv{i}", nn.BatchNorm2d(cout)))
            mods.append((f"relu_conv{i}", nn.ReLU()))
            self._depths.append((f"conv{i}", f"relu_conv{i}"))
            c = cout
        mods.append(("flatten", nn.Flatten(1)))
        features = c * h * w
        for j, width in enumerate(hidden, start=1):
            mods.append((f"fc{j}", nn.Linear(features, width)))
            if batch_norm:
                mods.append((f"bn_fc{j}", nn.BatchNorm1d(width)))
            mods.append((f"relu_fc{j}", nn.ReLU()))
            self._depths.append((f"fc{j}", f"relu_fc{j}"))
            features = width
        mods.append(("logits", nn.Linear(features, num_classes)))
        self.layers = nn.Sequential(OrderedDict(mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def depth_modules(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict((name, getattr(self.layers, module)) for name, module in self._depths)


def build_model(name: str | ModelName, num_classes: int, input_shape: Sequence[int],
                mean: Sequence[float], std: Sequence[float], **options: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of ``ModelName``'s values.
        num_classes, input_shape (c, h, w), mean, std: from the dataset's ``Splits``.
        options: ResNet-18/34/50: ``stem`` ("imagenet" | "small"; default "small" for inputs of
            at most 64 pixels, else "imagenet"). IBP CNNs: ``padding`` ("valid" | "same"),
            ``batch_norm`` (a batch norm after every layer).

    Raises:
        ValueError: unknown name or an option the model does not take.
    """
    try:
        model = ModelName(name)
    except ValueError:
        allowed = ", ".join(m.value for m in ModelName)
        raise ValueError(f"unknown model {name!r}; allowed: {allowed}") from None
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    allowed_options = {
        ModelName.RESNET18: {"stem"}, ModelName.RESNET34: {"stem"}, ModelName.RESNET50: {"stem"},
        **{name: {"padding", "batch_norm"}
           for name in (ModelName.IBP_SMALL, ModelName.IBP_MEDIUM, ModelName.IBP_LARGE)},
    }.get(model, set())
    unknown = set(options) - allowed_options
    if unknown:
        raise ValueError(f"model {model.value!r} takes no option(s) {sorted(unknown)}; "
                         f"allowed: {sorted(allowed_options) or 'none'}")
    built = _build(model, dict(num_classes=num_classes, input_shape=input_shape,
                               mean=[float(v) for v in mean], std=[float(v) for v in std]),
                   options)
    # Convolution weights in channels_last (NHWC) memory: oneDNN's NHWC kernels run a forward
    # plus input-gradient pass of resnet_digits about 1.6x faster than NCHW on a CPU core
    # (benchmarks.run --only layout); a layout, not a value: parameters and outputs are the same.
    built = built.to(memory_format=torch.channels_last)
    # What save_checkpoint stores so load_checkpoint can rebuild the same architecture.
    built.build_config = {"model": model.value, "num_classes": int(num_classes),
                          "input_shape": list(input_shape), "mean": [float(v) for v in mean],
                          "std": [float(v) for v in std], "options": dict(options)}
    return built


def _build(model: ModelName, common: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    input_shape = common["input_shape"]
    if model in (ModelName.RESNET18, ModelName.RESNET34, ModelName.RESNET50):
        stem = options.get("stem") or ("small" if max(input_shape[1:]) <= 64 else "imagenet")
        block, layers = {
            ModelName.RESNET18: (BasicBlock, (2, 2, 2, 2)),
            ModelName.RESNET34: (BasicBlock, (3, 4, 6, 3)),
            ModelName.RESNET50: (Bottleneck, (3, 4, 6, 3)),
        }[model]
        return ResNet(block, layers, stem=stem, **common)
    if model is ModelName.PREACT_RESNET18:
        return PreActResNet((2, 2, 2, 2), **common)
    if model is ModelName.RESNET_DIGITS:
        # Small enough to train on 8x8 digits on a CPU in seconds; its stem is 16 x 8 x 8 = 1,024-d.
        return ResNet(BasicBlock, (1, 1, 1), stem="small", widths=(16, 32, 64), **common)
    return IBPCNN(model.value, padding=options.get("padding"),
                  batch_norm=bool(options.get("batch_norm", False)), **common)


@torch.no_grad()
def depth_shapes(model: nn.Module) -> "OrderedDict[str, tuple[int, ...]]":
    """Activation shape (without batch) at every named depth, from one forward of zeros."""
    with capture(model, model.depth_modules()) as outputs, eval_mode(model):
        device = next(model.parameters()).device
        model(torch.zeros((1, *model.input_shape), device=device))
    return OrderedDict((name, tuple(out[0].shape[1:])) for name, out in outputs.items())
