"""Cross-check of ``defenses.crown`` against auto_LiRPA (the reference CROWN implementation,
0.7.1) on every built-in model and on two small CNNs trained for a few epochs on the 8x8 digits.

For each model, a few inputs and a couple of eps values, on the clipped L-inf box
[clip(x - eps, 0, 1), clip(x + eps, 0, 1)] (given to auto_LiRPA as ``x_L`` / ``x_U``):

- ``ibp``: ``defenses.ibp.interval_bounds`` vs auto_LiRPA ``method="IBP"`` (checks that both
  read the same network: a difference here is a conversion problem, not a CROWN one);
- ``crown-ibp``: ``crown_bounds(method="crown-ibp")`` vs ``method="CROWN-IBP"``;
- ``crown``: ``crown_bounds(method="crown")`` vs ``method="CROWN"`` (full CROWN costs one
  backward pass per hidden neuron: skipped where the model has more than ``--crown-max-neurons``
  pre-activation neurons per sample, e.g. the 64-wide ResNets);
- margins: ``crown_lower`` with ``margin_spec(y)`` vs auto_LiRPA with that spec as ``C``
  (y = the model's clean prediction, so some samples verify), and whether ``verified_crown``
  agrees with auto_LiRPA's margins (verified: every margin row j != y has lower bound >= 0, the
  rule ``verified_crown`` applies).

Each row reports the largest absolute difference of the bounds (logit bounds and margins),
the same relative to the largest reference bound and to the mean bound width, how much tighter
(> 0) or looser (< 0) ours are at most, and the number of samples whose verification disagrees.

What auto_LiRPA is given (``lirpa_copy``): a contiguous copy with ``Normalize`` as an equal
1x1 convolution, because auto_LiRPA 0.7.1 mis-bounds ``(x - mean) / std`` before a
zero-padded convolution in its CROWN intermediate bounds (``--keep-normalize`` shows it); and,
in this process only, ``_pad_attribute_shim`` so that its ``BoundPad`` parses the Pad nodes
torch >= 2.9 emits (``nn.ZeroPad2d``, in ibp_small / ibp_medium with SAME padding).

Expected differences, not bugs: max pools (ours bounds them by their interval, auto_LiRPA by
lines through the input with the largest lower bound: digits_cnn_maxpool, where ours are looser
and both sound). Full CROWN's intermediate bounds follow auto_LiRPA's default (CROWN's bound for
IBP-unstable neurons, IBP's for the rest, no intersection: ``compare_crown_with_ibp`` False).

Runs in float64 by default (``--float32`` for the training dtype; auto_LiRPA gets float64 as
the default dtype meanwhile, as some of its tensors are created in it), on one CPU thread.
The defaults (batch 4, eps 0.01 0.03 0.1, full CROWN up to 5,000 hidden neurons) take about
five minutes on one core; ibp_large's full CROWN (14,848 neurons) needs
``--crown-max-neurons 15000`` and about four minutes more at batch 2.

    python -m benchmarks.crown_crosscheck [--batch 4] [--eps 0.01 0.03 0.1] [--models ...]
        [--crown-max-neurons 5000] [--threads 1] [--float32] [--json PATH]
        [--keep-normalize] [--lirpa-compare-ibp]

auto_LiRPA is not on PyPI past 0.3: install the 0.7.1 source (github.com/Verified-Intelligence/
auto_LiRPA, ``__version__ = '0.7.1'``) with ``pip install --no-deps -e <src>`` next to torch,
numpy, packaging, appdirs, tqdm, pyyaml and graphviz (the Python package) in a scratch venv,
with this project ``pip install --no-deps -e .`` beside it (its setup.py pins torch < 2.9 and
torchvision, neither of which it needs to import). Without auto_LiRPA the module exits with
code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from defenses.crown import crown_bounds, crown_lower, margin_spec, verified_crown
from defenses.ibp import interval_bounds
from defenses.models import ModelName, Normalize, build_model

CLASSES = 10
SHAPE = (1, 8, 8)
MEAN, STD = (0.4,), (0.25,)
OPTIONS = {ModelName.IBP_SMALL: {"padding": "same"}, ModelName.IBP_MEDIUM: {"padding": "same"}}
# ours -> auto_LiRPA's method names
METHODS = {"crown-ibp": "CROWN-IBP", "crown": "CROWN"}
_NONLINEAR = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh,
              nn.Softplus)


def _lirpa() -> Any:
    """The auto_LiRPA module, or exit 2 with one line saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import auto_LiRPA  # noqa: F401
            from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: F401
    except Exception as err:  # ImportError, or auto_LiRPA's own imports failing
        first = next(iter(str(err).strip().splitlines()), "") or type(err).__name__
        print(f"crown_crosscheck: auto_LiRPA is not importable ({type(err).__name__}: {first}); "
              "install auto_LiRPA 0.7.1 from source (see this module's docstring)",
              file=sys.stderr)
        sys.exit(2)
    logging.getLogger("auto_LiRPA").setLevel(logging.ERROR)
    return auto_LiRPA


# ------------------------------------------------------------------------------------------------
# models


def _tame(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """As tests/test_ibp.py's ``tame``: each conv / linear output's weights sum to 1 in absolute
    value, eval-mode batch norm with random statistics and |scale| <= 1 (finite, informative
    bounds through the deep ResNets)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight /= m.weight.abs().flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_((torch.rand(n, generator=gen) * 3 - 1.5).clamp(-1.0, 1.0))
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def built_in(name: ModelName) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, CLASSES, SHAPE, MEAN, STD, **OPTIONS.get(name, {}))
    return _tame(model, torch.Generator().manual_seed(1))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(bunch.target, dtype=torch.long)


def digits_cnn(pool: bool) -> nn.Module:
    """A small CNN with eval-mode batch norm (``pool``: a 2x2 max pool instead of the strided
    convolution), trained for a few epochs on the first 1,400 digits."""
    torch.manual_seed(0)
    down = ([nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)] if pool
            else [nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU()])
    model = nn.Sequential(Normalize(MEAN, STD), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.ReLU(), *down, nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
                          nn.Linear(64, CLASSES))
    x, y = _digits()
    x, y = x[:1400], y[:1400]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        for idx in torch.randperm(len(x), generator=gen).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def hidden_neurons(model: nn.Module) -> int:
    """Pre-activation neurons per sample (inputs of the elementwise nonlinear modules)."""
    count = [0]
    hooks = [m.register_forward_hook(lambda _m, args, _out: count.__setitem__(
        0, count[0] + args[0][0].numel())) for m in model.modules() if isinstance(m, _NONLINEAR)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *SHAPE, dtype=next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    return count[0]


# ------------------------------------------------------------------------------------------------
# comparison


def _diff(ours_lower: torch.Tensor, theirs_lower: torch.Tensor,
          ours_upper: torch.Tensor | None = None, theirs_upper: torch.Tensor | None = None
          ) -> dict[str, float]:
    """max |ours - theirs|, that over max |theirs|, and the most ours is tighter (> 0) / looser
    (< 0) than theirs."""
    gaps, tighter = [ours_lower - theirs_lower], [ours_lower - theirs_lower]
    refs = [theirs_lower]
    if ours_upper is not None:
        gaps.append(ours_upper - theirs_upper)
        tighter.append(theirs_upper - ours_upper)
        refs.append(theirs_upper)
    gap = torch.cat([g.flatten() for g in gaps]).abs()
    tight = torch.cat([t.flatten() for t in tighter])
    ref = torch.cat([r.flatten() for r in refs]).abs().max()
    return {"abs": float(gap.max()), "rel": float(gap.max() / ref.clamp(min=1e-12)),
            "tighter": float(tight.max()), "looser": float(tight.min())}


def _affine_conv(norm: Normalize) -> nn.Conv2d:
    """``Normalize`` as the 1x1 convolution x / std - mean / std (diagonal weight)."""
    c = norm.mean.numel()
    conv = nn.Conv2d(c, c, 1).to(norm.mean.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.diag(1 / norm.std.flatten()).view(c, c, 1, 1))
        conv.bias.copy_(-(norm.mean / norm.std).flatten())
    return conv


def lirpa_copy(model: nn.Module, keep_normalize: bool = False) -> nn.Module:
    """The model as auto_LiRPA gets it: a contiguous (channels-first) copy in eval mode, each
    ``Normalize`` replaced by the same affine map as a 1x1 convolution (unless
    ``keep_normalize``). auto_LiRPA 0.7.1 turns ``(x - mean) / std`` into a Sub and a Mul by
    constants, and in its default "patches" conv mode it bounds the constant's contribution
    through a zero-padded convolution as if the padding held the constant
    (``Bound.get_bias``, operators/base.py, Patches branch for operands without a batch
    dimension: ``torch.sum(patches, dim=(-1, -2, -3)) * bias``, marked FIXME there): its CROWN
    intermediate bounds of the border neurons of the first padded convolution come out shifted,
    so full CROWN is wrong there (CROWN-IBP, whose only backward pass starts from a matrix, is
    not affected)."""
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    if keep_normalize:
        return plain
    if isinstance(plain, Normalize):
        return _affine_conv(plain)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Normalize):
                setattr(parent, name, _affine_conv(child))
    return plain


def _pad_attribute_shim(lirpa: Any) -> None:
    """auto_LiRPA 0.7.1's ``BoundPad`` takes the pads as an input (ONNX opset >= 11), but
    torch >= 2.9's TorchScript graph pass (``torch.onnx.utils._optimize_graph``, outside
    auto_LiRPA's supported torch < 2.9) emits ``onnx::Pad`` with a ``pads`` attribute: every
    ``nn.ZeroPad2d`` fails with "BoundPad.forward() missing 1 required positional argument:
    'pad'". In this process only, a Pad without the input reads the attribute; its bounds
    (``interval_propagate``, ``bound_backward``) are auto_LiRPA's own."""
    from auto_LiRPA.operators import BoundPad

    if getattr(BoundPad, "_crosscheck_shim", False):
        return
    forward = BoundPad.forward

    def shimmed(self, x, pad=None, value=0.0):
        if pad is None:
            pad, value = self.attr["pads"], self.attr.get("value", value)
        return forward(self, x, pad, value)

    BoundPad.forward = shimmed
    BoundPad._crosscheck_shim = True


class Reference:
    """auto_LiRPA's bounds of one model (on ``lirpa_copy`` of it)."""

    def __init__(self, lirpa: Any, model: nn.Module, x: torch.Tensor, bound_opts: dict | None,
                 keep_normalize: bool = False):
        self.lirpa = lirpa
        plain = lirpa_copy(model, keep_normalize)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            self.module = lirpa.BoundedModule(plain, x.contiguous(), bound_opts=bound_opts,
                                              device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.module(x.contiguous())

    def bounds(self, x: torch.Tensor, eps: float, method: str, C: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ptb = self.lirpa.PerturbationLpNorm(norm=math.inf, x_L=(x - eps).clamp(0, 1),
                                            x_U=(x + eps).clamp(0, 1))
        bt = self.lirpa.BoundedTensor(x.contiguous(), ptb)
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            lower, upper = self.module.compute_bounds(x=(bt,), method=method, C=C,
                                                      bound_upper=C is None)
        return lower, upper


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """auto_LiRPA creates some tensors (identity specifications, sparse ones, scatter targets)
    in the default dtype: in float64 it fails ("expected scalar type Double but found Float")
    unless the default is float64 too."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def compare(name: str, model: nn.Module, x: torch.Tensor, eps_values: list[float],
            lirpa: Any, crown_max: int, bound_opts: dict | None,
            keep_normalize: bool = False) -> list[dict]:
    with _default_dtype(x.dtype):
        return _compare(name, model, x, eps_values, lirpa, crown_max, bound_opts,
                        keep_normalize)


def _compare(name: str, model: nn.Module, x: torch.Tensor, eps_values: list[float],
             lirpa: Any, crown_max: int, bound_opts: dict | None,
             keep_normalize: bool) -> list[dict]:
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    ref = Reference(lirpa, model, x, bound_opts, keep_normalize)
    forward_gap = float((ref.forward(x) - logits).abs().max())
    neurons = hidden_neurons(model)
    spec = margin_spec(y, CLASSES, x.dtype)
    others = torch.ones_like(spec[:, :, 0], dtype=torch.bool).scatter(1, y[:, None], False)
    rows = []
    for eps in eps_values:
        with torch.no_grad():
            ours = interval_bounds(model, x, eps)
        theirs = ref.bounds(x, eps, "IBP")
        rows.append({"model": name, "eps": eps, "method": "ibp", "forward": forward_gap,
                     "bounds": _diff(ours.lower, theirs[0], ours.upper, theirs[1])})
        for method, theirs_method in METHODS.items():
            row: dict[str, Any] = {"model": name, "eps": eps, "method": method}
            if method == "crown" and neurons > crown_max:
                row["skipped"] = f"{neurons} hidden neurons > --crown-max-neurons {crown_max}"
                rows.append(row)
                continue
            start = time.perf_counter()
            with torch.no_grad():
                ours = crown_bounds(model, x, eps, method=method)
                ours_margin = crown_lower(model, x, eps, spec, method=method)
                ours_verified = verified_crown(model, x, y, eps, method=method)
            row["ours_s"] = time.perf_counter() - start
            start = time.perf_counter()
            theirs = ref.bounds(x, eps, theirs_method)
            theirs_margin, _ = ref.bounds(x, eps, theirs_method, C=spec)
            row["theirs_s"] = time.perf_counter() - start
            theirs_verified = ((theirs_margin >= 0) | ~others).all(1)
            row["bounds"] = _diff(ours.lower, theirs[0], ours.upper, theirs[1])
            row["margins"] = _diff(ours_margin, theirs_margin)
            row["verified_ours"] = int(ours_verified.sum())
            row["verified_theirs"] = int(theirs_verified.sum())
            row["disagree"] = int((ours_verified != theirs_verified).sum())
            row["width"] = float((theirs[1] - theirs[0]).mean())
            row["per_width"] = row["bounds"]["abs"] / max(row["width"], 1e-300)
            rows.append(row)
    return rows


def _fmt(row: dict) -> str:
    head = f"{row['model']:<20} {row['eps']:<7g} {row['method']:<10}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    b = row["bounds"]
    text = f"{head} {b['abs']:9.2e} {b['rel']:9.2e} {b['tighter']:+10.2e} {b['looser']:+10.2e}"
    if "forward" in row:
        text += f"   (forward |d| {row['forward']:.2e})"
    if "margins" in row:
        m = row["margins"]
        text += (f" {m['abs']:9.2e} {m['rel']:9.2e} {row['width']:9.3g} {row['per_width']:9.2e}"
                 f"  {row['verified_ours']:>2}/{row['verified_theirs']:<2} {row['disagree']:>3}"
                 f"  {row['ours_s']:6.2f}s {row['theirs_s']:6.2f}s")
    return text


HEADER = (f"{'model':<20} {'eps':<7} {'method':<10} {'bounds|d|':>9} {'rel':>9} "
          f"{'tighter':>10} {'looser':>10} {'margin|d|':>9} {'rel':>9} {'width':>9} "
          f"{'|d|/width':>9}  "
          f"ver o/t dis    ours   lirpa")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--models", nargs="+", default=None,
                        help="names among the built-ins, digits_cnn, digits_cnn_maxpool")
    parser.add_argument("--crown-max-neurons", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--lirpa-compare-ibp", action="store_true",
                        help="auto_LiRPA bound_opts compare_crown_with_ibp=True (diagnostic)")
    parser.add_argument("--keep-normalize", action="store_true",
                        help="give auto_LiRPA Normalize as (x - mean) / std, not as a 1x1 "
                             "convolution (diagnostic: see lirpa_copy)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    lirpa = _lirpa()
    _pad_attribute_shim(lirpa)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.float32 else torch.float64
    bound_opts = {"compare_crown_with_ibp": True} if args.lirpa_compare_ibp else None

    builders: dict[str, Callable[[], nn.Module]] = {
        m.value: (lambda m=m: built_in(m)) for m in ModelName}
    builders["digits_cnn"] = lambda: digits_cnn(pool=False)
    builders["digits_cnn_maxpool"] = lambda: digits_cnn(pool=True)
    names = args.models or list(builders)
    unknown = sorted(set(names) - set(builders))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(builders)}")

    gen = torch.Generator().manual_seed(2)
    held_out, _ = _digits()
    held_out = held_out[1400:]
    print(f"auto_LiRPA {getattr(lirpa, '__version__', '?')} at {lirpa.__file__}; torch "
          f"{torch.__version__}; {dtype}; batch {args.batch}")
    print("bounds|d|: max |ours - auto_LiRPA| over lower and upper logit bounds; rel: over "
          "max |auto_LiRPA bound|; tighter / looser: max / min of how much ours are tighter; "
          "margin: the same for lower bounds of z_y - z_j (y = clean prediction); width: mean "
          "auto_LiRPA logit-bound width; |d|/width: bounds|d| over it; ver o/t dis: samples "
          "verified by ours / auto_LiRPA, disagreements; seconds: ours (bounds, margins, "
          "verified_crown) / auto_LiRPA (bounds, margins)")
    print(HEADER)
    rows = []
    for name in names:
        model = builders[name]().to(dtype)
        if name.startswith("digits"):
            x = held_out[torch.randperm(len(held_out), generator=gen)[:args.batch]]
        else:
            x = torch.rand(args.batch, *SHAPE, generator=gen)
        x = x.to(dtype)
        try:
            model_rows = compare(name, model, x, args.eps, lirpa, args.crown_max_neurons,
                                 bound_opts, args.keep_normalize)
        except Exception as err:  # one model failing (e.g. in auto_LiRPA's parser) is a row
            first = next(iter(str(err).strip().splitlines()), "")
            model_rows = [{"model": name, "eps": float("nan"), "method": "-",
                           "skipped": f"error {type(err).__name__}: {first}"}]
        for row in model_rows:
            print(_fmt(row), flush=True)
        rows += model_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
