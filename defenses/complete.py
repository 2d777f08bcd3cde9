"""Complete verification of L-inf robustness: each sample proved, falsified or left undecided
at its time limit, by a mixed-integer linear program (Tjeng, Xiao and Tedrake 2019, "Evaluating
Robustness of Neural Networks with Mixed Integer Programming") solved by HiGHS through
``scipy.optimize.milp``.

The question for a sample x of label y: is there an x' in the box ``[clip(x - eps), clip(x +
eps)]`` (inside [0, 1]) whose logit ``z_j(x')`` reaches ``z_y(x')`` for some class j != y?

The program is exact for networks of affine operations and piecewise-linear activations:
- every affine node (linear, conv, batch norm in eval mode, normalisation, average pooling,
  reshaping, sums, products by constants) is its Jacobian and offset, equalities
  ``v = J u + c`` (J taken once per model by ``torch.func.jacrev``; the node is affine, so the
  point does not matter);
- a ReLU (or leaky ReLU of slope s in [0, 1]) ``y = max(v, s v)`` with pre-activation bounds
  l <= v <= u is ``y = v`` where l >= 0, ``y = s v`` where u <= 0, and otherwise, with a binary
  d (1: the active piece), Tjeng et al.'s big-M constraints ``y >= v``, ``y >= s v``,
  ``y <= v - (1 - s) l (1 - d)`` and ``y <= s v + (1 - s) u d``;
- the bounds l, u are the tightest we have: IBP's intersected with full CROWN's (each sound,
  so their intersection is), which makes most neurons stable and the big-M constants small.
Anything else (max pooling, smooth activations, batch norm in train mode) is refused in one
line naming the operation.

Each sample goes through the cheap steps first, and the program only decides what they leave:
1. a sample the model misclassifies is falsified by itself (x is in its ball);
2. PGD with restarts on the cross-entropy: a point the model misclassifies is a
   counterexample;
3. a margin ``z_y - z_j`` that an incomplete certificate (IBP with the last layer elided,
   alpha-CROWN on IBP's or on full CROWN's pre-activation bounds; alpha-CROWN starts from
   CROWN's own lines, so CROWN-IBP is included) already bounds above 0 needs no program; all
   of them: proved;
4. for each margin left, the class with the weakest certified bound first, the program
   minimises ``z_y - z_j``. The margin is proved when HiGHS's bound on the minimum (its dual
   bound, valid also when it stops at the time limit) exceeds the threshold below; the sample
   is falsified when the program's minimiser, clipped to the model's own box in the model's
   dtype, is misclassified by the model's forward pass (never by the program's word alone).
   The time limit is the sample's, shared by its margins; a sample not decided within it is
   undecided (``by``: ``time limit``; ``tolerance`` when a margin's minimum is within the
   threshold of 0 and its minimiser fools nothing; ``solver`` when HiGHS fails).

What is proved is the model in float64 arithmetic, up to HiGHS's tolerances (1e-7 on each
row, which big-M rows of many terms can amplify): a margin counts as proved only when its
bound exceeds ``tolerance * (1 + s)``, s the largest logit magnitude in the box (``tolerance``
1e-5 by default), a guard against rounding, not a proof about the float32 model's own
rounding.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import fx, nn

from defenses.attacks import default_alpha, pgd
from defenses.crown import _Pass, margin_spec
from defenses.ibp import _input_box, _operation, _plan, probe_input
from defenses.interval_rules import Interval
from defenses.linear_relaxations import _PiecewiseLinear
from defenses.models import eval_mode

__all__ = ["UNDECIDED", "PROVED", "FALSIFIED", "CompleteVerification", "verify_complete",
           "check_complete", "MAX_JACOBIAN_ENTRIES"]

UNDECIDED, PROVED, FALSIFIED = 0, 1, 2

# an affine node whose dense Jacobian has more entries than this is refused: the program is
# for the small networks certified training produces, not for ResNets
MAX_JACOBIAN_ENTRIES = 50_000_000


@dataclass(frozen=True)
class CompleteVerification:
    """Per sample: ``status`` (UNDECIDED 0, PROVED 1, FALSIFIED 2), ``by`` (what decided it:
    ``clean``, ``attack``, ``bounds`` or ``milp``; or why it is undecided: ``time limit``,
    ``tolerance``, ``solver``), ``x_adv`` (the counterexample where falsified, NaN
    elsewhere), ``seconds`` (the sample's whole time) and ``programs`` (mixed-integer programs
    solved)."""

    status: np.ndarray
    by: list[str]
    x_adv: np.ndarray
    seconds: np.ndarray
    programs: np.ndarray

    def rate(self, status: int) -> float:
        return float(np.mean(self.status == status)) if len(self.status) else math.nan

    @property
    def proved_rate(self) -> float:
        return self.rate(PROVED)

    @property
    def falsified_rate(self) -> float:
        return self.rate(FALSIFIED)

    @property
    def undecided_rate(self) -> float:
        return self.rate(UNDECIDED)


# ------------------------------------------------------------------------------------------------
# the encoding


class _Program:
    """The exact mixed-integer encoding of one model, one sample's box (a pass over a batch of
    one) and its bounds: variable blocks per node, rows of constraints, integrality."""

    def __init__(self, run: _Pass, jacobians: "_Jacobians"):
        self.run = run
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.size = 0
        self.rows: list[sparse.spmatrix] = []  # each [r, size-at-the-time] (padded at the end)
        self.row_low: list[np.ndarray] = []
        self.row_high: list[np.ndarray] = []
        self.block: dict[fx.Node, np.ndarray] = {}  # node -> variable indices (flattened value)
        self._assembled: tuple[np.ndarray, Bounds, LinearConstraint] | None = None
        for node in run.order:
            self._encode(node, jacobians)

    # -- variables and rows

    def _variables(self, low: np.ndarray, high: np.ndarray, integer: bool = False
                   ) -> np.ndarray:
        n = len(low)
        index = np.arange(self.size, self.size + n)
        self.size += n
        self.lower.append(low)
        self.upper.append(high)
        self.integer.append(np.full(n, int(integer)))
        return index

    def _rows(self, columns: list[np.ndarray], values: list[Any], low: np.ndarray,
              high: np.ndarray) -> None:
        """Rows ``low <= sum_k values[k] * x[columns[k]] <= high``, one per entry: each pair is
        (indices [r], coefficients [r]) or (indices [n], a sparse matrix [r, n])."""
        r = len(low)
        total = None
        for cols, vals in zip(columns, values):
            if sparse.issparse(vals):
                m = sparse.csr_matrix((vals.data, cols[vals.indices], vals.indptr),
                                      shape=(r, self.size))
            else:
                m = sparse.csr_matrix((np.broadcast_to(vals, (r,)).astype(np.float64),
                                       (np.arange(r), cols)), shape=(r, self.size))
            total = m if total is None else total + m
        self.rows.append(total)
        self.row_low.append(low)
        self.row_high.append(high)

    def _bounds(self, node: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """The node's value bounds for this sample: IBP's, intersected with full CROWN's where
        it tightened them."""
        box = self.run.env[node]
        low, high = box.lower[0], box.upper[0]
        tight = self.run.pre.get(node)
        if tight is not None:
            low = torch.maximum(low, tight.lower[0])
            high = torch.minimum(high, tight.upper[0])
        low, high = _flat(low), _flat(high)
        return low, np.maximum(high, low)

    # -- nodes

    def _encode(self, node: fx.Node, jacobians: "_Jacobians") -> None:
        run = self.run
        if not isinstance(run.env[node], Interval):
            return  # a constant of the graph (a shape, a captured tensor)
        kind, payload = run._kind(node)
        if kind == "input":
            self.block[node] = self._variables(*self._bounds(node))
            return
        inputs = [n for n in node.all_input_nodes if isinstance(run.env[n], Interval)]
        if kind == "identity":
            self.block[node] = self.block[inputs[0]]
            return
        if kind == "lines" and isinstance(payload, _PiecewiseLinear):
            self._piecewise(node, inputs[0], payload.slope)
            return
        if kind == "affine":
            self._affine(node, inputs, jacobians)
            return
        raise _refused(node, run.model)

    def _affine(self, node: fx.Node, inputs: list[fx.Node], jacobians: "_Jacobians") -> None:
        matrices, offset = jacobians.of(node, inputs)
        out = self._variables(*self._bounds(node))
        self.block[node] = out
        # v - sum_k J_k u_k = c
        columns = [out] + [self.block[n] for n in inputs]
        values = [np.ones(len(out))] + [-m for m in matrices]
        self._rows(columns, values, offset, offset)

    def _piecewise(self, node: fx.Node, source: fx.Node, slope: float) -> None:
        v = self.block[source]
        low, high = self._bounds(source)
        piece = lambda t: np.where(t >= 0, t, slope * t)  # noqa: E731  (monotone)
        y = self._variables(piece(low), piece(high))
        self.block[node] = y
        active, inactive = low >= 0, high <= 0
        unstable = ~(active | inactive)
        one = np.ones
        if active.any():  # y = v
            i = np.flatnonzero(active)
            self._rows([y[i], v[i]], [one(len(i)), -one(len(i))], np.zeros(len(i)),
                       np.zeros(len(i)))
        if inactive.any():  # y = s v
            i = np.flatnonzero(inactive)
            self._rows([y[i], v[i]], [one(len(i)), np.full(len(i), -slope)], np.zeros(len(i)),
                       np.zeros(len(i)))
        if unstable.any():
            i = np.flatnonzero(unstable)
            r, l, u = len(i), low[i], high[i]
            d = self._variables(np.zeros(r), np.ones(r), integer=True)
            inf, zero = np.full(r, np.inf), np.zeros(r)
            # y - v >= 0 and y - s v >= 0
            self._rows([y[i], v[i]], [one(r), -one(r)], zero, inf)
            self._rows([y[i], v[i]], [one(r), np.full(r, -slope)], zero, inf)
            # y - v - (1 - s) l d <= -(1 - s) l
            self._rows([y[i], v[i], d], [one(r), -one(r), -(1 - slope) * l], -inf,
                       -(1 - slope) * l)
            # y - s v - (1 - s) u d <= 0
            self._rows([y[i], v[i], d], [one(r), np.full(r, -slope), -(1 - slope) * u], -inf,
                       zero)

    # -- solving

    def minimise_margin(self, y: int, j: int, time_limit: float
                        ) -> tuple[float, np.ndarray | None, bool]:
        """(a lower bound of min z_y - z_j over the box, the program's minimiser of the input
        or None, whether HiGHS failed: infeasible or a numerical error)."""
        out = self.block[self.run.plan.output]
        cost = np.zeros(self.size)
        cost[out[y]] += 1.0
        cost[out[j]] -= 1.0
        if self._assembled is None:
            matrix = sparse.vstack([sparse.csr_matrix((m.data, m.indices, m.indptr),
                                                      shape=(m.shape[0], self.size))
                                    for m in self.rows], format="csr")
            self._assembled = (
                np.concatenate(self.integer),
                Bounds(np.concatenate(self.lower), np.concatenate(self.upper)),
                LinearConstraint(matrix, np.concatenate(self.row_low),
                                 np.concatenate(self.row_high)))
        integrality, bounds, constraints = self._assembled
        result = milp(cost, integrality=integrality, bounds=bounds, constraints=constraints,
                      options={"time_limit": max(time_limit, 1e-3), "disp": False})
        if result.status not in (0, 1):
            # infeasible (the sample itself is a feasible point: the bounds or the solver are
            # wrong) or a numerical failure: nothing is claimed
            return -math.inf, None, True
        # HiGHS's dual bound is what it proved (an "optimal" primal value may sit above the
        # true minimum by the relative gap it accepts); a pure LP has none: its optimum
        dual = result.get("mip_dual_bound")
        if dual is not None and np.isfinite(dual):
            bound = float(dual)
        else:
            solved = result.status == 0 and result.fun is not None
            bound = float(result.fun) if solved else -math.inf
        x = None if result.x is None else result.x[self.block[self.run.plan.input]]
        return bound, x, False


class _Jacobians:
    """Each affine node's Jacobians (one per bounded argument, scipy CSR [out, in]), taken once
    per model, and its offset for the pass's sample (``f(u) - J u`` at its box centres)."""

    def __init__(self, run: _Pass,
                 cache: dict[fx.Node, list[sparse.csr_matrix]] | None = None):
        self.run = run
        # shared across the samples of one model (its nodes are the same plan's)
        self.cache: dict[fx.Node, list[sparse.csr_matrix]] = {} if cache is None else cache

    def of(self, node: fx.Node, inputs: list[fx.Node]
           ) -> tuple[list[sparse.csr_matrix], np.ndarray]:
        run = self.run
        centres = [(run.env[n].lower + run.env[n].upper) / 2 for n in inputs]

        def f(*ts: torch.Tensor) -> torch.Tensor:
            return run._call(node, dict(zip(inputs, ts)))

        with torch.no_grad():
            value = f(*centres)
        if node not in self.cache:
            inputs_size = sum(c.numel() for c in centres)
            if value.numel() * inputs_size > MAX_JACOBIAN_ENTRIES:
                raise ValueError(
                    f"complete verification: node {node.name!r} maps {inputs_size} "
                    f"inputs to {value.numel()} outputs, a Jacobian above "
                    f"{MAX_JACOBIAN_ENTRIES:,} entries: the model is too large to encode")
            with torch.enable_grad():
                full = torch.func.jacrev(f, argnums=tuple(range(len(centres))))(*centres)
            self.cache[node] = [sparse.csr_matrix(
                jac.reshape(value.numel(), c.numel()).detach().cpu().numpy())
                for jac, c in zip(full, centres)]
        matrices = self.cache[node]
        offset = _flat(value[0]) - sum(m @ _flat(c[0]) for m, c in zip(matrices, centres))
        return matrices, offset


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).to(torch.float64).cpu().numpy()


def _refused(node: fx.Node, model: nn.Module) -> ValueError:
    return ValueError(f"complete verification cannot encode {_operation(node, model)} at node "
                      f"{node.name!r}: only affine operations and "
                      f"ReLU / leaky ReLU activations have an exact mixed-integer encoding")


# ------------------------------------------------------------------------------------------------
# the public API


def check_complete(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Refuse a model the program cannot encode exactly (in eval mode, on one probe input):
    one line naming the operation, or the node whose Jacobian is too large.

    Raises:
        ValueError: naming the operation or node.
    """
    x = probe_input(model, tuple(input_shape), torch.Generator().manual_seed(0))[:1]
    double = _double(model)
    run = _Pass(double, _plan(double), _input_box(x.to(torch.float64), 0.0))
    _Program(run, _Jacobians(run))


def _double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.float64).eval()


def verify_complete(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    time_limit: float = 10.0, tolerance: float = 1e-5,
                    attack_steps: int = 50, attack_restarts: int = 3, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None
                    ) -> CompleteVerification:
    """Decide each sample of (x, y) at radius eps: proved, falsified or undecided within
    ``time_limit`` seconds of its programs (see the module's docstring for the steps). One
    sample at a time: full CROWN bounds the union of a batch's unstable neurons, so batching
    costs more than it shares.

    Args:
        model: an eval-mode-ready network of affine operations and (leaky) ReLUs.
        x, y: inputs in [0, 1] and labels.
        time_limit: the programs' seconds per sample, shared by its margins.
        tolerance: a margin is proved when its bound exceeds ``tolerance * (1 + s)``, s the
            largest magnitude the logits can take in the box.
        attack_steps, attack_restarts: the PGD run before any bound (0 steps: none).
        progress: called with (samples done, samples) after each sample.
    """
    if eps < 0 or time_limit <= 0:
        raise ValueError(f"eps must be >= 0 and time_limit > 0, got {eps} and {time_limit}")
    n = x.shape[0]
    status = np.zeros(n, dtype=np.int8)
    by = [""] * n
    x_adv = np.full((n, *x.shape[1:]), np.nan, dtype=np.float32)
    seconds = np.zeros(n)
    programs = np.zeros(n, dtype=np.int64)
    double = _double(model)
    plan = _plan(double)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    matrices: dict[fx.Node, list[sparse.csr_matrix]] = {}
    with eval_mode(model):
        for i in range(n):
            began = time.perf_counter()
            xi, yi = x[i:i + 1].to(device), y[i:i + 1].to(device)
            label = int(yi)
            with torch.no_grad():
                clean = int(model(xi).argmax(1)) != label
            found = None if clean else _attack(model, xi, yi, eps, attack_steps,
                                                attack_restarts, generator)
            if clean:
                status[i], by[i] = FALSIFIED, "clean"
                x_adv[i] = xi[0].cpu().numpy()
            elif found is not None:
                status[i], by[i] = FALSIFIED, "attack"
                x_adv[i] = found.cpu().numpy()
            else:
                status[i], by[i], found_x, programs[i] = _decide(
                    model, double, plan, xi, yi, eps, matrices, time_limit, tolerance)
                if found_x is not None:
                    x_adv[i] = found_x
            seconds[i] = time.perf_counter() - began
            if progress is not None:
                progress(i + 1, n)
    return CompleteVerification(status, by, x_adv, seconds, programs)


def _decide(model: nn.Module, double: nn.Module, plan, x: torch.Tensor, y: torch.Tensor,
            eps: float, matrices: dict, time_limit: float, tolerance: float
            ) -> tuple[int, str, np.ndarray | None, int]:
    """One sample no attack broke: its margins bounded (IBP, then alpha-CROWN on IBP's and on
    full CROWN's pre-activation bounds; each sound, so the largest is), then the programs."""
    run = _Pass(double, plan, _input_box(x.to(torch.float64), eps))
    label = int(y)
    with torch.no_grad():
        out = run.env[plan.output]
        spec = margin_spec(y, out.lower.shape[1], torch.float64)
        # alpha-CROWN on IBP's pre-activation bounds (what the sweep's certificate uses) and
        # on full CROWN's, which are not tighter everywhere: the tightest of each margin
        certified = torch.maximum(-run.ibp_margins(y), run.alpha_lower(plan.output, spec))
        run.tighten()
        certified = torch.maximum(certified, run.alpha_lower(plan.output, spec))[0]
        scale = float(torch.maximum(out.lower.abs(), out.upper.abs()).max())
    threshold = tolerance * (1.0 + scale)
    open_margins = [int(j) for j in torch.argsort(certified).tolist()
                    if j != label and not float(certified[j]) > threshold]
    if not open_margins:
        return PROVED, "bounds", None, 0
    return _solve(model, run, label, open_margins, _Jacobians(run, matrices), x[0], eps,
                  time_limit, threshold)


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
            restarts: int, generator: torch.Generator) -> torch.Tensor | None:
    """PGD's point [*input] when the model misclassifies it, else None (also without
    steps)."""
    if steps <= 0 or eps == 0:
        return None
    adv = pgd(model, x, y, eps, default_alpha(eps, steps), steps, restarts=restarts,
              generator=generator)
    with torch.no_grad():
        return adv[0] if int(model(adv).argmax(1)) != int(y) else None


def _solve(model: nn.Module, run: _Pass, label: int, margins: list[int],
           jacobians: _Jacobians, x: torch.Tensor, eps: float, time_limit: float,
           threshold: float) -> tuple[int, str, np.ndarray | None, int]:
    """Programs for the open margins, weakest first, within ``time_limit`` seconds:
    (status, what decided it, the counterexample or None, programs solved)."""
    began = time.perf_counter()
    program = _Program(run, jacobians)
    # the model's own box, in its dtype: a counterexample is clipped to it and checked there
    low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    solved, open_reason = 0, ""
    for j in margins:
        left = time_limit - (time.perf_counter() - began)
        if left <= 0:
            return UNDECIDED, "time limit", None, solved
        bound, point, failed = program.minimise_margin(label, j, left)
        solved += 1
        if failed:
            open_reason = "solver"
            continue
        if bound > threshold:
            continue
        if point is not None:
            candidate = torch.from_numpy(point).reshape(x.shape).to(x)
            candidate = torch.min(torch.max(candidate, low), high)
            with torch.no_grad():
                if int(model(candidate[None]).argmax(1)) != label:
                    return FALSIFIED, "milp", candidate.cpu().numpy(), solved
        # neither proved nor broken: the sample cannot be proved, but another margin may still
        # break it
        open_reason = open_reason or ("time limit" if time.perf_counter() - began >= time_limit
                                      else "tolerance")
    if open_reason:
        return UNDECIDED, open_reason, None, solved
    return PROVED, "milp", None, solved
