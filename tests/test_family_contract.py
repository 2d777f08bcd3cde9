"""Every registered defense family through the same checks (in the style of Optuna's sampler
tests): a space of it loads, its parameters are validated and resolved from what a searcher
draws, its metrics, requirements, trial function and test-split bookkeeping hold together;
and the seam itself: nothing outside ``orchestrator/families`` asks which family it is, and a
new family is one module and one ``register`` call."""

import inspect
import re
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from pydantic import BaseModel

from orchestrator import families
from orchestrator.families import DefenseFamily, family_names, get_family, register
from orchestrator.loading import load_space
from orchestrator.params import TRAINING_FIELDS, resolve
from orchestrator.searchers import DefineByRun
from orchestrator.space import SpaceError

ROOT = Path(__file__).resolve().parents[1]

# one small space per family, searched (each must hold for every family registered)
SPACES = {
    "lesci": """
        params:
          depth: {choice: [stem, [stem, layer1]]}
          n_components: {choice: [4, 8]}
          k: [1, 3]
          threshold: {uniform: [0.5, 1.0]}
        attack: {eps: 0.1, steps: 2, samples: 16}
        optimize: {accuracy: max, projection_rate: max}
    """,
    "ibp": """
        model: {name: ibp_small}
        params:
          eps_train: {uniform: [0.05, 0.2]}
          lr: {loguniform: [0.0001, 0.01]}
        attack: {eps: 0.1, steps: 2}
        optimize: {verified_accuracy: max, nominal_accuracy: max}
    """,
    "adversarial": """
        model: {name: ibp_small}
        params:
          eps: 0.1
          objective: {choice: {pgd: {steps: {int: [2, 4]}}, fgsm: {}}}
        attack: {eps: 0.1, steps: 2}
        optimize: {nominal_accuracy: max, pgd_accuracy: max}
    """,
}


def space_text(name: str, **updates) -> str:
    data = {"name": "contract", "family": name, "dataset": {"name": "digits"},
            "model": {"name": "resnet_digits"}, "training": {"epochs": 1},
            **yaml.safe_load(textwrap.dedent(SPACES[name]))}
    data.update(updates)
    return yaml.safe_dump(data)


def load(tmp_path, name: str, **updates):
    path = tmp_path / "space.yaml"
    path.write_text(space_text(name, **updates))
    return load_space(path, check_model=False)


def test_every_registered_family_has_a_contract_space():
    assert set(family_names()) == set(SPACES)


@pytest.fixture(params=sorted(SPACES))
def family(request) -> str:
    return request.param


def test_a_space_of_the_family_loads_and_names_it(tmp_path, family):
    spec = load(tmp_path, family)
    assert spec.family == family and spec.defense is get_family(family)
    assert spec.defense.name == family and isinstance(spec.defense, DefenseFamily)


def test_metrics_and_directions_hold_together(tmp_path, family):
    spec = load(tmp_path, family)
    impl = spec.defense
    assert impl.metrics and set(impl.metrics.values()) <= {"max", "min"}
    assert all(impl.metrics[m] == mode for m, mode in spec.optimize.items())
    reported = impl.reported_metrics(spec)
    assert set(spec.optimize) <= set(reported)
    metrics, modes = impl.search_metrics(spec)
    assert len(metrics) == len(modes) and set(modes) <= {"max", "min"}
    assert impl.counts() and "samples" in impl.counts()
    assert set(impl.required_metrics(spec)) <= set(metrics) | set(reported)
    assert isinstance(impl.describe(spec), str) and isinstance(impl.unit, str)
    assert isinstance(impl.lenient_metrics(spec), bool)


def test_a_metric_of_no_use_to_the_family_is_refused(tmp_path, family):
    with pytest.raises(SpaceError, match=rf"optimize.no_such_metric: not a metric of family "
                                         rf"'{family}'; allowed: "):
        load(tmp_path, family, optimize={"no_such_metric": "max"})


def test_a_metric_optimized_the_wrong_way_is_refused(tmp_path, family):
    impl = get_family(family)
    data = yaml.safe_load(space_text(family))
    metric = next(iter(data["optimize"]))
    wrong = "min" if impl.metrics[metric] == "max" else "max"
    with pytest.raises(SpaceError, match=rf"optimize.{metric}: {wrong}, but a"):
        load(tmp_path, family, optimize={metric: wrong})


def test_each_required_parameter_is_required(tmp_path, family):
    impl = get_family(family)
    for key in impl.required_params:
        data = yaml.safe_load(space_text(family))
        del data["params"][key]
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(SpaceError, match=rf"params.{key}: required for family "
                                             rf"'{family}'"):
            load_space(path, check_model=False)


def test_an_unknown_parameter_is_named(tmp_path, family):
    data = yaml.safe_load(space_text(family))
    data["params"]["no_such_param"] = 3
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError, match=r"params.no_such_param: not a parameter of"):
        load_space(path, check_model=False)


def test_what_a_searcher_draws_resolves_to_typed_parameters(tmp_path, family):
    spec = load(tmp_path, family)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        DefineByRun(spec)(trial)
        typed = resolve(spec, trial.params)
        assert isinstance(typed.params, BaseModel)
        assert typed.params == spec.defense.trial_params(spec, trial.params)
        logged = typed.logged()
        for key, value in trial.params.items():  # every drawn value is on the child run
            assert logged[key.rsplit(".", 1)[-1]] == value, key
        assert set(TRAINING_FIELDS) - {"augmentation"} <= set(logged)
        study.tell(trial, 0.5)


def test_the_trial_function_and_the_test_split_bookkeeping(tmp_path, family):
    spec = load(tmp_path, family)
    impl = spec.defense
    trainable = impl.trainable()
    assert list(inspect.signature(trainable).parameters) == ["config", "spec_json",
                                                            "storage_uri"]
    row = {"trial_id": "t1", "config": {}, "trial_dir": "dir1",
           **{key: 3 for key in impl.point_keys}}
    item = {"trial_id": "t1", "config": {}}
    impl.test_item(item, row)
    impl.test_item(item, row)
    assert impl.row_key(row) == ("t1", *([3] * len(impl.point_keys)))
    if impl.surface:  # every front point of a trial goes to its one test evaluation
        assert impl.point_keys and item["points"] == [[3, 3], [3, 3]]
    else:
        assert not impl.point_keys and item["trial_dir"] == "dir1"


def test_nothing_outside_the_families_asks_which_family_it_is():
    """The seam: the rest of orchestrator/ looks the family up and never compares it."""
    pattern = re.compile(r"Family\.(LESCI|IBP|ADVERSARIAL)|family(\.value)?\s*(==|!=|is|in)\s"
                         r"|[\"'](lesci|ibp|adversarial)[\"']\s*(==|!=|in)\s")
    found = []
    for path in sorted((ROOT / "orchestrator").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


class _Toy(DefenseFamily):
    """A new family, as a researcher would add one: its module, then ``register``."""

    name = "toy"
    metrics = {"score": "max"}
    required_params = ("width",)

    class Params(BaseModel):
        width: int

    def check_params(self, spec):
        for key in spec.params:
            if key not in ("width", *TRAINING_FIELDS):
                raise ValueError(f"params.{key}: not a parameter of family 'toy'")

    def trial_params(self, spec, config):
        width = spec.params["width"]
        return self.Params(width=config.get("width", width) if not isinstance(width, int)
                           else width)

    def trainable(self):
        return _toy_trial

    def evaluate_test(self, spec, splits, device, cache, log, item, storage):
        return {"metrics": {"score": 1.0}}


def _toy_trial(config, spec_json, storage_uri):
    from ray import tune

    tune.report({"score": 1.0 / (1 + config.get("width", 1))})


def test_a_family_without_its_trial_function_cannot_be_made():
    class Half(DefenseFamily):
        name = "half"

        def check_params(self, spec):
            pass

        def trial_params(self, spec, config):
            return None

    with pytest.raises(TypeError, match="abstract.*evaluate_test"):
        Half()


@pytest.fixture
def toy():
    family = register(_Toy())
    yield family
    del families._FAMILIES[family.name]


def test_a_new_family_is_a_module_and_its_registration(tmp_path, toy):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "family": "toy", "dataset": {"name": "digits"},
        "model": {"name": "resnet_digits"}, "params": {"width": {"choice": [2, 4]}},
        "optimize": {"score": "max"}}))
    spec = load_space(path, check_model=False)
    assert spec.defense is toy and spec.searched_names() == ["width"]
    assert resolve(spec, {"width": 4}).params.width == 4
    path.write_text(path.read_text().replace("width", "depth"))
    with pytest.raises(SpaceError, match="params.width: required for family 'toy'"):
        load_space(path, check_model=False)
    with pytest.raises(ValueError, match="a family needs a new name"):
        register(_Toy())


def test_an_unknown_family_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown family 'nope'; allowed: lesci, ibp, "
                                         "adversarial"):
        get_family("nope")
