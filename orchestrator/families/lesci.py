"""LESCI: a kNN-vote projection layer at one depth, or a Deep k-NN vote over several (Papernot
& McDaniel 2018). A trial is one (depth or depths, n_components, embedding size, centring,
calibration); it evaluates its whole (k, m) surface from one k_max search per depth,
so ``k`` and ``threshold`` span the surface instead of being searched."""

from __future__ import annotations

import math
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      field_validator)

from orchestrator.distributions import (DIST_TYPES, Choice, Grid, IntRange, LogUniform,
                                        Uniform, values_of)
from defenses.surface import SurfacePoint, min_votes_for, surface_points
from orchestrator.families.base import DefenseFamily
from orchestrator.params import TRAINING_FIELDS, chosen, validate

__all__ = ["LESCIFamily", "LESCIParams", "depth_label", "depth_values", "DEPTH_JOIN"]

# Several depths voting together, as one value: "stem+layer1" (a module path has no "+").
DEPTH_JOIN = "+"


def depth_label(where: str, value: Any) -> str:
    """A LESCI depth value as its one name: a module path, or a list of them (one vote over
    all: Deep k-NN, Papernot & McDaniel 2018) joined by ``DEPTH_JOIN`` ("stem+layer1").
    ``ValueError`` naming ``where`` for anything else, an empty name or a depth listed twice."""
    if isinstance(value, str):
        parts = value.split(DEPTH_JOIN)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise ValueError(f"{where}: a depth (a module path such as layer1) or a list of "
                         f"depths that vote together, got {value!r}")
    if not all(parts):
        raise ValueError(f"{where}: an empty depth name in {value!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"{where}: each depth once in a vote, got {value!r}")
    return DEPTH_JOIN.join(parts)


class LESCIParams(BaseModel):
    """Where and how a LESCI layer projects: the PCA at ``depth`` truncated to
    ``n_components``, an embedding space of ``embedding_size`` training samples (all of them
    when unset), centred by the PCA mean (``center``, the default) or not (x @ P).

    ``depth`` may name several depths ("stem+layer1", written as a list in a space): each has
    its own PCA and space, and their k nearest neighbours vote together (Deep k-NN, Papernot &
    McDaniel 2018). ``calibration``: a fraction of the training split (or a count) held out of
    the PCAs and embedding spaces, which gives each (k, m) point its Deep k-NN credibility;
    unset: none (the whole split builds the spaces, and credibility is not measured)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: str
    n_components: int = Field(ge=1)
    embedding_size: int | None = Field(default=None, ge=1)
    center: StrictBool = True
    calibration: StrictInt | StrictFloat | None = None

    @field_validator("depth", mode="before")
    @classmethod
    def _depth(cls, value: Any) -> str:
        return depth_label("depth", value)

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration(cls, value: Any) -> int | float | None:
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise ValueError("a fraction of the training split, in (0, 1), or a count of "
                             "training samples")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a fraction of the training split must be in (0, 1)")
        if isinstance(value, int) and value < 1:
            raise ValueError("a count of training samples must be >= 1")
        return value

    @property
    def depths(self) -> list[str]:
        """The depths that vote (one for single-depth LESCI)."""
        return self.depth.split(DEPTH_JOIN)


def _number_range(spec, key: str) -> tuple[float, float] | None:
    values = spec.values_of(key)
    if values is None:
        return None
    if isinstance(values, tuple):
        return values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"params.{key}: expected numbers, got {values}")
    return min(values), max(values)


# the attack race's smallest first rung, in attack samples: below it no bound at the race's
# confidence is narrow enough to stop a point, and each rung pays the suite's overhead again
MIN_RACE_GRACE = 10


class LESCIFamily(DefenseFamily):
    name = "lesci"
    metrics = {name: "max" for name in (
        "accuracy", "projection_rate", "accuracy_projected", "accuracy_identity",
        "robust_accuracy", "transfer_robust_accuracy")}
    required_params = ("depth", "n_components", "k")
    surface = True
    point_keys = ("k", "min_votes")
    unit = "surface points"
    surface_params = ("k", "threshold")
    # scheduler: mo_asha races the attacks on the surface inside each trial
    # (orchestrator.racing): its rungs count attack samples, its budget the (point, sample)
    # pairs attacked
    budget_unit = "attack_point_samples"
    rung_unit = "attack samples"
    stops_in_trial = True

    # -- parameters ------------------------------------------------------------------------

    def parse_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Several depths voting together are one value of ``depth``: "stem+layer1"."""
        if "depth" in params:
            params = {**params, "depth": _depth_values(params["depth"])}
        return params

    def check_params(self, spec) -> None:
        fields = set(LESCIParams.model_fields) | set(self.surface_params)
        for key in spec.params:
            if key not in fields and key not in TRAINING_FIELDS:
                raise ValueError(f"params.{key}: not a parameter of family 'lesci'; allowed: "
                                 f"{', '.join([*LESCIParams.model_fields, *self.surface_params])}"
                                 f" and the training fields ({', '.join(TRAINING_FIELDS)})")
        own = {k: v for k, v in spec.params.items() if k in LESCIParams.model_fields}
        validate(LESCIParams, own, {"": "params", **{k: f"params.{k}" for k in own}})

    def trial_params(self, spec, config: dict[str, Any]) -> LESCIParams:
        keys = [k for k in spec.params if k in LESCIParams.model_fields]
        return LESCIParams(**chosen(spec, config, keys))

    def search_metrics(self, spec) -> tuple[list[str], list[str]]:
        # a trial is its whole surface: the searcher compares surfaces by their hypervolume
        return ["hypervolume"], ["max"]

    def required_metrics(self, spec) -> list[str]:
        return ["hypervolume"]

    # -- the surface every trial evaluates ----------------------------------------------------

    def vote_depths(self, spec) -> list[int]:
        """How many depths the trials' votes span (1 for single-depth LESCI)."""
        return sorted({len(str(v).split(DEPTH_JOIN)) for v in values_of(spec.params["depth"])})

    def surface_ks(self, spec) -> list[int]:
        """The k values of every trial's surface (a number, a list, choice/grid values, or
        every integer of an int range)."""
        value = spec.params.get("k")
        values = value if isinstance(value, list) else spec.values_of("k")
        return sorted({int(v) for v in values})

    def surface_points(self, spec, depths: int = 1) -> list[SurfacePoint]:
        """Every (k, m) point of the surface of a trial voting over ``depths`` depths
        (m = 1..depths*k), thresholds m/(depths*k) restricted by ``threshold``: absent, every
        m; a range {uniform: [lo, hi]}, every one inside it; a number or a list, each
        threshold t's rule, m = ceil(t * depths * k) (t <= 0: m = 1)."""
        ks = self.surface_ks(spec)
        value = spec.params.get("threshold")
        if value is None:
            return surface_points(ks, depths=depths)
        if isinstance(value, Uniform):
            return surface_points(ks, tuple(value.uniform), depths)
        if isinstance(value, (Choice, Grid)):
            value = list(value.choice if isinstance(value, Choice) else value.grid)
        thresholds = value if isinstance(value, list) else [value]
        return sorted({SurfacePoint(k, min_votes_for(float(t), depths * k), depths)
                       for k in ks for t in thresholds})

    def largest_surface(self, spec) -> int:
        """The most (k, m) points any trial of the space evaluates."""
        return max(len(self.surface_points(spec, n)) for n in self.vote_depths(spec))

    # -- checks ----------------------------------------------------------------------------

    def check(self, spec) -> None:
        """The surface (k, threshold), the sizes, the attack's keys and the scheduler."""
        if spec.attack is not None and spec.attack.suite != type(spec.attack.suite)():
            raise ValueError("attack.suite: the training families' suite; LESCI's attacks on "
                             "the vote are set under attack.apgd")
        if spec.verify.complete:
            raise ValueError("verify.complete: complete verification proves a network's "
                             "decision; LESCI's vote over a kNN index has no exact encoding "
                             "(the training families only)")
        if spec.scheduler.name == "asha":
            raise ValueError("scheduler: asha needs trials that report per epoch; LESCI trials "
                             "report once (use none, or mo_asha to race the attacks)")
        if spec.scheduler.name == "mo_asha":
            if spec.attack is None:
                raise ValueError("scheduler: mo_asha races LESCI's attacks; this space has no "
                                 "attack (add one, or use none)")
            if spec.search.repeats != 1:
                raise ValueError(f"search.repeats: {spec.search.repeats} seeds; the attack "
                                 "race (scheduler: mo_asha) runs on one seed (use repeats 1, "
                                 "or scheduler none)")
            if spec.scheduler.grace_period < MIN_RACE_GRACE:
                raise ValueError(f"scheduler.grace_period: {spec.scheduler.grace_period} attack "
                                 f"samples; the attack race's first rung needs at least "
                                 f"{MIN_RACE_GRACE} to bound anything (try 30)")
        k_value = spec.params["k"]
        if isinstance(k_value, (Uniform, LogUniform)):
            raise ValueError("params.k: the surface needs whole numbers: a number, a list, "
                             "{grid: [...]}, {choice: [...]} or {int: [lo, hi]} (every integer)")
        raw_ks = k_value if isinstance(k_value, list) else spec.values_of("k")
        if not raw_ks or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and float(v).is_integer() and v >= 1 for v in raw_ks):
            raise ValueError(f"params.k: must be whole numbers >= 1, got {raw_ks}")
        threshold = spec.params.get("threshold")
        if isinstance(threshold, (LogUniform, IntRange)):
            raise ValueError("params.threshold: a number, a list, {choice/grid: [...]} or a "
                             "range {uniform: [lo, hi]}")
        if isinstance(threshold, Uniform):
            high = threshold.uniform[1]
        else:
            values = (threshold if isinstance(threshold, list) else [] if threshold is None
                      else spec.values_of("threshold"))
            values = values if isinstance(values, list) else list(values)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"params.threshold: expected numbers, got {values}")
            high = max(values, default=1.0)
        if high > 1:
            raise ValueError(f"params.threshold: must be <= 1 (a vote fraction; <= 0 means "
                             f"always project), got max {high}")
        try:
            for depths in self.vote_depths(spec):
                self.surface_points(spec, depths)
        except ValueError as exc:
            raise ValueError(f"params.threshold: {exc}") from None
        size = _number_range(spec, "embedding_size")
        k_max = max(self.surface_ks(spec))
        if size and size[0] < k_max:
            raise ValueError(f"params.embedding_size: {int(size[0])} is smaller than the "
                             f"largest k ({k_max})")

    def check_model(self, spec, model, input_shape) -> None:
        """Every depth is a module of the model that outputs one tensor, runs once per
        forward and has at least the largest n_components dimensions."""
        from orchestrator.probes import model_depths

        n_components = _number_range(spec, "n_components")
        depths = {info.name: info for info in model_depths(spec, model, input_shape)}
        for depth in depth_values(spec.params["depth"]):
            info = depths.get(depth)
            if info is None:
                shown = list(depths)[:12]
                raise ValueError(f"params.depth: {depth!r} is not a depth of "
                                 f"{spec.model.label}; allowed: {', '.join(shown)}"
                                 f"{' ...' if len(depths) > 12 else ''} (--list-depths lists "
                                 "them all)")
            if info.shape is None:
                raise ValueError(f"params.depth: {depth!r} ({info.module}) does not output "
                                 "one tensor")
            if info.calls != 1:
                raise ValueError(f"params.depth: {depth!r} ({info.module}) runs {info.calls} "
                                 "times in one forward (a module used twice); choose a module "
                                 "that runs once")
            dims = math.prod(info.shape)
            if n_components and n_components[1] > dims:
                raise ValueError(f"params.n_components: {int(n_components[1])} exceeds the "
                                 f"{dims} dimensions of depth {depth!r}")

    def check_data(self, spec, splits) -> None:
        """The calibration split leaves samples on both sides of the training split; the
        race's first rung is below the attack samples."""
        from orchestrator.lesci_stages import calibration_count

        for value in values_of(spec.params.get("calibration")):  # a range: its two ends
            if value is not None:
                calibration_count(len(splits.train), value)
        if spec.scheduler.name == "mo_asha" and spec.attack is not None:
            grace = spec.scheduler.grace_period
            total = len(splits.val) if spec.attack.samples is None else min(
                spec.attack.samples, len(splits.val))
            if grace >= total:
                raise ValueError(f"scheduler.grace_period: {grace} is at or above the "
                                 f"{total} attack samples of the val split: no rung would "
                                 "stop anything")

    # -- the attack race (scheduler: mo_asha) ----------------------------------------------

    def full_budget(self, spec) -> float:
        """The attack samples (the race's last rung): ``attack.samples``, or the whole val
        split when unset (unknown before the data: infinite here)."""
        if spec.attack is None or spec.attack.samples is None:
            return math.inf
        return spec.attack.samples

    def trial_full_budget(self, spec, result: dict[str, Any]) -> float:
        return float(result.get("attack_point_samples_full", 0))

    def full_budget_reached(self, spec, result: dict[str, Any]) -> bool:
        """A trial reached its full budget when a point of its surface was attacked on every
        sample (its raced-out points never reach the front, ``raced_out``)."""
        return int(result.get("surface_full_points", 0)) > 0

    def stopped_at(self, spec, result: dict[str, Any]) -> str:
        return f"attack samples {int(result.get('race_stopped_at', 0))}"

    def searcher_budget(self, spec) -> tuple[str, float] | None:
        # a trial whose whole surface was raced out ends short: PRUNED for Optuna
        return "surface_full_points", 1.0

    # -- what a trial reports ----------------------------------------------------------------

    def reported_metrics(self, spec) -> list[str]:
        """LESCI's robust figures only with an attack in the space, and its gain over the
        bare model."""
        names = [m for m in self.metrics if spec.attack is not None or "robust" not in m]
        return names + (["robust_gain"] if spec.attack is not None else [])

    def counts(self) -> list[str]:
        return ["samples", "attacked_samples", "calibration_samples"]

    def describe(self, spec) -> str:
        sizes = sorted({len(self.surface_points(spec, n)) for n in self.vote_depths(spec)})
        shown = "-".join(str(n) for n in dict.fromkeys([sizes[0], sizes[-1]]))
        return f", each a surface of {shown} (k, m) points"

    # -- running ---------------------------------------------------------------------------

    def trainable(self):
        from orchestrator.lesci_trial import lesci_trial

        return lesci_trial

    def test_item(self, item: dict[str, Any], row: dict[str, Any]) -> None:
        item.setdefault("points", []).append([int(row["k"]), int(row["min_votes"])])

    def evaluate_test(self, spec, splits, device, cache, log, item, storage) -> dict[str, Any]:
        """The trial's front points on the test split, with the bare model's figures (a
        stage: computed once, then read back)."""
        import json

        from defenses.surface import SurfacePoint
        from orchestrator.params import resolve
        from orchestrator.lesci_trial import lesci_figures, surface_rows

        trial = resolve(spec, item["config"])
        depths = len(trial.params.depths)
        points = [SurfacePoint(int(k), int(m), depths) for k, m in item["points"]]
        inputs = {"split": "test", "dataset": spec.dataset.model_dump(),
                  "model": spec.model.model_dump(), "training": trial.training.as_dict(),
                  # (without a calibration split, the key single-depth trials always had)
                  "lesci": trial.params.model_dump(exclude=set() if trial.params.calibration
                                                   is not None else {"calibration"}),
                  "repeats": spec.search.repeats,
                  "attack": None if spec.attack is None else spec.attack.model_dump(),
                  "points": [[p.k, p.min_votes] for p in points]}

        def compute() -> bytes:
            metrics, budget, base, size = lesci_figures(spec, trial, points, splits, "test",
                                                        device, cache, log)
            return json.dumps({"rows": surface_rows(trial, size, points, metrics),
                               "base": base, "budget": budget}).encode()

        return json.loads(cache.get("test", inputs, compute, trial.params.depth))


def _depth_values(value: Any) -> Any:
    """Each value of ``depth`` (fixed, or of a choice or grid) as its one name."""
    if isinstance(value, (Choice, Grid)):
        kind = "choice" if isinstance(value, Choice) else "grid"
        labels = [depth_label(f"params.depth.{kind}[{i}]", v)
                  for i, v in enumerate(getattr(value, kind))]
        votes = [frozenset(label.split(DEPTH_JOIN)) for label in labels]
        if len(set(votes)) != len(votes):  # the order of a vote's depths does not matter
            raise ValueError(f"params.depth.{kind}: the same vote listed twice ({labels})")
        return type(value)(**{kind: labels})
    if isinstance(value, DIST_TYPES):
        raise ValueError("params.depth: a depth, a list of depths, or {choice/grid: [...]} of "
                         "them")
    return depth_label("params.depth", value)


def depth_values(value: Any) -> list[str]:
    """Every depth a ``depth`` param can name (each vote's depths, in order, once)."""
    return list(dict.fromkeys(d for v in values_of(value) for d in str(v).split(DEPTH_JOIN)))
