"""Search spaces: the shipped ones validate; bad ones give one clear line and exit code 2."""

import textwrap

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.loading import load_space, shipped_spaces
from orchestrator.space import SpaceError

GOOD = textwrap.dedent("""
    name: t
    family: lesci
    dataset: {name: digits}
    model: {name: resnet_digits}
    training: {epochs: 2}
    params:
      depth: {choice: [stem, pool]}
      n_components: 8
      k: {int: [1, 8]}
      threshold: {uniform: [0.0, 0.9]}
    optimize: {accuracy: max, projection_rate: max}
""")


TRAINING = textwrap.dedent("""
    name: t
    family: adversarial
    dataset: {name: digits}
    model: {name: ibp_small}
    training: {epochs: 2}
    params:
      eps: 0.1
      objective:
        choice:
          pgd: {steps: {int: [2, 4]}}
          fgsm: {mix: {uniform: [0.0, 0.5]}}
    attack: {eps: 0.1}
    optimize: {nominal_accuracy: max, pgd_accuracy: max}
""")


def variant(path_updates=None, drop=None, raw=None, base=GOOD):
    data = yaml.safe_load(base)
    for dotted, value in (path_updates or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    for dotted in drop or []:
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return raw if raw is not None else yaml.safe_dump(data)


BAD = [
    ("malformed yaml", variant(raw="name: t\nparams: {k: [1, 2\n"), r"not valid YAML"),
    ("empty file", variant(raw=""), r"empty file"),
    ("a list", variant(raw="- 1\n- 2\n"), r"expected a mapping at the top level"),
    ("unknown top key", variant({"budget": 3}), r"budget: Extra inputs are not permitted"),
    ("unknown family", variant({"family": "crown"}), r"family: unknown family 'crown'; allowed: lesci, ibp, adversarial"),
    ("bad name", variant({"name": "a b/c"}), r"name: use letters, digits"),
    ("name with ..", variant({"name": "a..b"}), r"name: use letters, digits, '-', '_' and single"),
    ("unknown dataset", variant({"dataset.name": "imagenet"}),
     r"dataset.name: unknown dataset 'imagenet'; allowed: digits, mnist"),
    ("missing root", variant({"dataset.name": "mnist"}), r"dataset.root: required"),
    ("unknown model", variant({"model.name": "vgg"}), r"model.name: unknown model 'vgg'"),
    ("bad model option", variant({"model.options": {"stem": "x"}}),
     r"model: model 'resnet_digits' takes no option"),
    ("unknown param", variant({"params.temperature": 2}),
     r"params.temperature: not a parameter of family 'lesci'"),
    ("missing param", variant(drop=["params.k"]), r"params.k: required for family 'lesci'"),
    ("two distributions", variant({"params.k": {"int": [1, 2], "choice": [1]}}),
     r"params.k: a distribution needs exactly one of"),
    ("wrong type in range", variant({"params.threshold": {"uniform": ["a", 1]}}),
     r"params.threshold: uniform.0: Input should be a valid number"),
    ("inverted range", variant({"params.threshold": {"uniform": [0.9, 0.1]}}),
     r"params.threshold.uniform: \[0.9, 0.1\] is empty or inverted"),
    ("empty range", variant({"params.threshold": {"uniform": [0.5, 0.5]}}),
     r"is empty or inverted"),
    ("inverted int range", variant({"params.k": {"int": [9, 2]}}),
     r"params.k.int: \[9, 2\] is inverted"),
    ("loguniform at 0", variant({"params.embedding_size": {"loguniform": [0.0, 1.0]}}),
     r"params.embedding_size.loguniform: bounds must be > 0"),
    ("threshold not a range", variant({"params.threshold": {"loguniform": [0.1, 1.0]}}),
     r"params.threshold: a number, a list, \{choice/grid: \[...\]\} or a range"),
    ("k from a float range", variant({"params.k": {"uniform": [1, 8]}}),
     r"params.k: the surface needs whole numbers"),
    ("center not a boolean", variant({"params.center": "yes"}),
     r"params.center: Input should be a valid boolean"),
    ("k < 1", variant({"params.k": {"int": [0, 5]}}), r"params.k: must be whole numbers >= 1"),
    ("threshold > 1", variant({"params.threshold": {"uniform": [0.0, 1.5]}}),
     r"params.threshold: must be <= 1"),
    ("n_components > activation", variant({"params.n_components": 100, "params.depth": "pool"}),
     r"params.n_components: 100 exceeds the 64 dimensions of depth 'pool'"),
    ("unknown depth", variant({"params.depth": {"choice": ["stem", "layer9"]}}),
     r"params.depth: 'layer9' is not a depth of resnet_digits; allowed: stem, layer1"),
    ("embedding smaller than k", variant({"params.embedding_size": 4}),
     r"params.embedding_size: 4 is smaller than the largest k \(8\)"),
    ("unknown metric", variant({"optimize": {"acc": "max"}}),
     r"optimize.acc: not a metric of family 'lesci'"),
    ("bad mode", variant({"optimize": {"accuracy": "up"}}),
     r"optimize.accuracy: Input should be 'max' or 'min'"),
    ("robust objective without attack", variant({"optimize": {"robust_accuracy": "max"}}),
     r"optimize.robust_accuracy: needs an attack"),
    ("asha with two metrics to optimize", variant({"scheduler": "asha"}),
     r"scheduler: asha takes one metric to optimize"),
    ("grid with a range", variant({"search": {"algorithm": "grid"},
                                   "params.embedding_size": {"uniform": [100, 200]}}),
     r"params.embedding_size: the grid algorithm needs choice or grid values"),
    ("bad training field", variant({"training": {"epochs": 0}}),
     r"training.epochs: Input should be greater than or equal to 1"),
    ("unknown training field", variant({"training": {"epoch": 3}}),
     r"training.epoch: Extra inputs are not permitted"),
    ("bad augmentation", variant({"training": {"augmentation": {"flipp": True}}}),
     r"training.augmentation.flipp: Extra inputs are not permitted"),
    ("bad augmentation value", variant({"training": {"augmentation": {"salt_pepper": 2}}}),
     r"training.augmentation.salt_pepper: Input should be less than or equal to 1"),
    ("searched training field out of range", variant({"params.lr": {"uniform": [-1, 1]}}),
     r"params.lr: Input should be greater than 0"),
    ("inapplicable shared parameter", variant({"params.steps": 3}, base=TRAINING),
     r"params.steps: not a parameter of objective 'fgsm' \(its parameters: eps, mix\); put it "
     r"under the objectives it applies to"),
    ("unknown objective parameter", variant({"params.objective.choice.pgd.step": 3},
                                            base=TRAINING),
     r"params.objective.pgd.step: not a parameter of objective 'pgd'; its parameters: eps, "
     r"alpha, steps, restarts"),
    ("objective parameter out of range", variant({"params.objective.choice.pgd.steps":
                                                  {"int": [0, 3]}}, base=TRAINING),
     r"params.objective.pgd.steps: Input should be greater than or equal to 1"),
    ("required objective parameter", variant(drop=["params.eps"], base=TRAINING),
     r"params.objective.(fgsm|pgd): eps is required"),
    ("unknown objective", variant({"params.objective": {"choice": ["pgd", "trades"]}},
                                  base=TRAINING),
     r"params.objective: unknown objective 'trades'; allowed: standard, fgsm"),
    ("objective grid under nsga2", variant({"params.objective": {"grid": ["pgd", "fgsm"]},
                                            "search": {"algorithm": "nsga2"}}, base=TRAINING),
     r"params.objective: grid needs algorithm grid"),
    ("ibp with another objective", variant({"family": "ibp", "params.objective": "pgd",
                                            "optimize": {"verified_accuracy": "max"}},
                                           base=TRAINING),
     r"params.objective: family 'ibp' trains with ibp, crown_ibp, fast_ibp, sabr, mtl_ibp, "
     r"cc_ibp, exp_ibp, taps, staps \(IBP and its named recipes\), got 'pgd'"),
    ("sabr's box ratio out of range", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"sabr": {"lam": 1.5}}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.objective.sabr.lam: Input should be less than or equal to 1"),
    ("an expressive loss's alpha out of range", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {
            "grid": {"mtl_ibp": {"alpha": {"grid": [0.5, -0.2]}}}}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.objective.mtl_ibp.alpha: Input should be greater than or equal to 0"),
    ("TAPS without its split", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"taps": {}}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.objective.taps: split is required"),
    ("TAPS split at a module the model does not have", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"grid": {
            "ibp": {}, "staps": {"split": {"grid": ["layers.relu_conv2", "layers.conv9"]}}}}},
         "search": {"algorithm": "grid"}, "optimize": {"verified_accuracy": "max"},
         "model.options": {"padding": "same"}}, base=TRAINING),
     r"params.objective.staps.split: no module 'layers.conv9' in IBPCNN"),
    ("TAPS split at a container, no single step of the graph", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"taps": {
            "split": "layers"}}}, "optimize": {"verified_accuracy": "max"},
         "model.options": {"padding": "same"}}, base=TRAINING),
     r"params.objective.taps.split: module 'layers' of IBPCNN is not one step of its graph"),
    ("TAPS's gradient connector threshold out of range", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"taps": {
            "split": "layers.relu_conv2", "c": 0}}}, "optimize": {"verified_accuracy": "max"}},
        base=TRAINING),
     r"params.objective.taps.c: Input should be greater than 0"),
    ("batch norms on a model that is no IBP CNN", variant(
        {"family": "ibp", "model": {"name": "resnet_digits"},
         "params": {"eps_train": 0.1, "batch_norm": {"choice": [False, True]}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.batch_norm: only the built-in IBP CNNs \(ibp_small, ibp_medium, ibp_large\)"),
    ("IBP initialisation of a fine-tuned model", variant(
        {"family": "ibp", "model": {"name": "ibp_small", "checkpoint": "/models/net.pt"},
         "params": {"eps_train": 0.1, "init": "ibp"},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.init: changes a fresh model, but the space fine-tunes model.checkpoint"),
    ("the fast-IBP recipe's batch norms on a model that is no IBP CNN", variant(
        {"family": "ibp", "model": {"name": "resnet_digits"},
         "params": {"eps_train": 0.1, "objective": {"grid": ["ibp", "fast_ibp"]}},
         "search": {"algorithm": "random"}, "optimize": {"verified_accuracy": "max"}},
        base=TRAINING),
     r"params.objective.fast_ibp.batch_norm \(objective fast_ibp's default, True\): only the "
     r"built-in IBP CNNs"),
    ("the fast-IBP recipe on a fine-tuned model", variant(
        {"family": "ibp", "model": {"name": "ibp_small", "checkpoint": "/models/net.pt"},
         "params": {"eps_train": 0.1, "objective": {"fast_ibp": {"batch_norm": False}}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.objective.fast_ibp.init \(objective fast_ibp's default, ibp\): changes a fresh "
     r"model, but the space fine-tunes model.checkpoint"),
    ("a recipe contradicted", variant(
        {"family": "ibp", "params": {"eps_train": 0.1,
                                     "objective": {"crown_ibp": {"bound": "ibp"}}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.objective.crown_ibp.bound: objective crown_ibp bounds by crown_ibp; for another "
     r"bound use objective ibp \(got 'ibp'\)"),
    ("an unknown bound", variant(
        {"family": "ibp", "params": {"eps_train": 0.1, "bound": {"choice": ["ibp", "crown"]}},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING),
     r"params.bound.*'ibp' or 'crown_ibp'"),
    ("num_samples 0", variant({"search": {"num_samples": 0}}),
     r"search.num_samples: Input should be greater than or equal to 1"),
    ("negative gpu", variant({"resources": {"gpu": -1}}), r"resources.gpu"),
    ("suite metric under asha", variant({"optimize": {"robust_accuracy": "max"},
                                         "scheduler": "asha"}, base=TRAINING),
     r"optimize.robust_accuracy: measured once, after the last epoch, so scheduler asha"),
    ("an unknown scheduler", variant({"scheduler": {"name": "hyperband"}}, base=TRAINING),
     r"scheduler.name: Input should be 'none', 'asha' or 'mo_asha'"),
    ("mo_asha's reduction factor below 2", variant(
        {"scheduler": {"name": "mo_asha", "reduction_factor": 1}}, base=TRAINING),
     r"scheduler.reduction_factor: Input should be greater than or equal to 2"),
    ("mo_asha of an unknown type", variant(
        {"scheduler": {"name": "mo_asha", "type": "halving"}}, base=TRAINING),
     r"scheduler.type: Input should be 'promotion' or 'stopping'"),
    ("mo_asha's grace period at the full budget", variant(
        {"scheduler": {"name": "mo_asha", "grace_period": 2}}, base=TRAINING),
     r"scheduler.grace_period: 2 is at or above the full budget \(2 epochs\)"),
    ("mo_asha with one objective", variant(
        {"scheduler": {"name": "mo_asha"}, "optimize": {"pgd_accuracy": "max"}},
        base=TRAINING), r"scheduler: mo_asha ranks several objectives; with one metric to "
                        r"optimize use asha"),
    ("mo_asha on lesci without an attack to race", variant({"scheduler": "mo_asha"}),
     r"scheduler: mo_asha races LESCI's attacks; this space has no attack"),
    ("the attack race over several seeds", variant(
        {"scheduler": "mo_asha", "attack": {"eps": 0.1, "samples": 100},
         "search": {"repeats": 2}}), r"search.repeats: 2 seeds; the attack race"),
    ("the attack race's first rung too small", variant(
        {"scheduler": "mo_asha", "attack": {"eps": 0.1, "samples": 100}}),
     r"scheduler.grace_period: 1 attack samples; the attack race's first rung needs at least "
     r"10"),
    ("the attack race's first rung at the attack samples", variant(
        {"scheduler": {"name": "mo_asha", "grace_period": 100},
         "attack": {"eps": 0.1, "samples": 100}}),
     r"scheduler.grace_period: 100 is at or above the full budget \(100 attack samples\)"),
    ("a suite metric under mo_asha", variant(
        {"optimize": {"robust_accuracy": "max", "nominal_accuracy": "max"},
         "scheduler": {"name": "mo_asha"}}, base=TRAINING),
     r"optimize.robust_accuracy: measured once, after the last epoch, so scheduler mo_asha"),
    ("negative square budget", variant({"attack.suite": {"square_queries": -1}}, base=TRAINING),
     r"attack.suite.square_queries: Input should be greater than or equal to 0"),
    ("unknown suite key", variant({"attack.suite": {"p_init": 0.5}}, base=TRAINING),
     r"attack.suite.p_init: Extra inputs are not permitted"),
    ("lesci's apgd in a training space", variant({"attack.apgd": {"steps": 10}}, base=TRAINING),
     r"attack.apgd: LESCI only; the training families' suite is set under attack.suite"),
    ("samples in a training space", variant({"attack.samples": 100}, base=TRAINING),
     r"attack.samples: LESCI only"),
    ("the training suite in a lesci space", variant({"attack": {"eps": 0.1, "suite": {
        "targets": 2}}}), r"attack.suite: the training families' suite; LESCI's attacks"),
    ("a depth twice in a vote", variant({"params.depth": ["stem", "stem"]}),
     r"params.depth: each depth once in a vote"),
    ("the same vote twice", variant({"params.depth": {"grid": [["stem", "pool"],
                                                                ["pool", "stem"]]}}),
     r"params.depth.grid: the same vote listed twice"),
    ("an unknown depth in a vote", variant({"params.depth": {"choice": ["stem",
                                                                        ["stem", "layer9"]]}}),
     r"params.depth: 'layer9' is not a depth of resnet_digits"),
    ("a depth that is not a name", variant({"params.depth": {"grid": ["stem", 3]}}),
     r"params.depth.grid\[1\]: a depth \(a module path such as layer1\) or a list"),
    ("calibration not a number", variant({"params.calibration": True}),
     r"params.calibration: a fraction of the training split, in \(0, 1\), or a count"),
    ("calibration above 1", variant({"params.calibration": 1.5}),
     r"params.calibration: a fraction of the training split must be in \(0, 1\)"),
    ("complete verification of LESCI", variant({"verify": {"complete": True}}),
     r"verify.complete: complete verification proves a network's decision"),
    ("a time limit of 0", variant({"verify": {"complete": True, "time_limit": 0}},
                                  base=TRAINING), r"verify.time_limit: .*greater than 0"),
    ("complete verification of max pooling", variant(
        {"verify": {"complete": True}, "model": {"name": "resnet18", "options": {
            "stem": "imagenet"}}}, base=TRAINING),
     r"verify.complete: model resnet18: complete verification cannot encode module maxpool "
     r"\(MaxPool2d\)"),
    ("complete verification of several seeds", variant(
        {"verify": {"complete": True}, "search.repeats": 2}, base=TRAINING),
     r"verify.complete: verifies one model per trial; set search.repeats to 1"),
]


@pytest.mark.parametrize("case, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_space_is_one_clear_line(tmp_path, capsys, case, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # the CLI: exit code 2, one line on stderr, no traceback, and nothing stored
    storage = tmp_path / "store"
    assert main(["--space", str(path), "--storage", str(storage),
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not storage.exists() and not (tmp_path / "m.db").exists()


def test_taps_split_is_checked_on_the_model_its_trials_build(tmp_path):
    """A split at a batch norm that the recipe's ``batch_norm`` adds loads; with the batch
    norms off, the same split names no module and is refused."""
    path = tmp_path / "space.yaml"
    for batch_norm, ok in ((True, True), (False, False)):
        path.write_text(variant(
            {"family": "ibp", "params": {"eps_train": 0.1, "objective": {"taps": {
                "split": "layers.bn_fc1", "batch_norm": batch_norm}}},
             "optimize": {"verified_accuracy": "max"}, "model.options": {"padding": "same"}},
            base=TRAINING))
        if ok:
            load_space(path)
        else:
            with pytest.raises(SpaceError, match="params.objective.taps.split: no module "
                                                 "'layers.bn_fc1'"):
                load_space(path)


def test_verifying_more_samples_than_the_test_split_is_refused_before_anything_runs(
        tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(variant({"verify": {"complete": True, "samples": 400},
                             "model.options": {"padding": "same"}}, base=TRAINING))
    load_space(path)  # the split's size is known once the dataset is opened
    with pytest.raises(SpaceError, match=r"verify.samples: 400 is above the test split's 360"):
        load_space(path, check_data=True)
    storage = tmp_path / "store"
    assert main(["--space", str(path), "--storage", str(storage),
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "verify.samples" in capsys.readouterr().err and not storage.exists()


@pytest.mark.parametrize("name", sorted(shipped_spaces()))
def test_shipped_spaces_validate(name):
    full, smoke = load_space(name), load_space(name, smoke_test=True)
    assert full.family == smoke.family
    assert smoke.search.num_samples <= full.search.num_samples


def test_cli_input_errors(tmp_path, capsys):
    args = ["--storage", str(tmp_path / "s"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    cases = [
        (["--space", "nope"], "--space nope: no such file, and not a shipped space"),
        (["--num-samples", "0"], "--num-samples: must be a positive integer"),
        (["--resume"], "--resume: needs --name"),
        (["--name", "a b"], "--name 'a b': use letters"),
        (["--mlflow-uri", "sqlite:////nonexistent/dir/m.db"], "folder /nonexistent/dir"),
        (["--mlflow-uri", "http://127.0.0.1:9"], "--mlflow-uri http://127.0.0.1:9: unreachable"),
        (["--storage", "/proc/forbidden"], "/proc/forbidden/.probe-"),
    ]
    for extra, message in cases:
        argv = [*args, *extra]
        if "--mlflow-uri" in extra:
            argv = ["--storage", str(tmp_path / "s"), *extra]
        if "--storage" in extra:
            argv = ["--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_mlflow_uri_password_is_redacted(tmp_path, capsys):
    assert main(["--storage", str(tmp_path / "s"),
                 "--mlflow-uri", "http://alice:s3cret@127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "***@127.0.0.1:9" in err


def _space_with(tmp_path, **updates):
    data = yaml.safe_load(GOOD)
    for dotted, value in updates.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_data_and_checkpoint_problems_are_exit_2_before_ray(tmp_path, capsys):
    from defenses.checkpoints import save_checkpoint
    from defenses.models import build_model
    from tests.conftest import make_mnist

    args = ["--storage", str(tmp_path / "s"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    make_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x01" * 9)
    make_mnist(tmp_path / "no-test")
    (tmp_path / "no-test" / "t10k-labels-idx1-ubyte").unlink()
    save_checkpoint(build_model("resnet18", 10, (1, 8, 8), (0.5,), (0.2,)), tmp_path / "r18.pt")
    save_checkpoint(build_model("resnet_digits", 4, (1, 8, 8), (0.5,), (0.2,)), tmp_path / "c4.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = [
        ({"dataset": {"name": "mnist", "root": str(tmp_path / "absent")}},
         "absent: no such directory"),
        ({"dataset": {"name": "mnist", "root": str(tmp_path / "mnist"), "val": 10}},
         "train-images-idx3-ubyte: truncated IDX header"),
        # the test split's files must be there (they are read only after the search)
        ({"dataset": {"name": "mnist", "root": str(tmp_path / "no-test"), "val": 10}},
         "t10k-labels-idx1-ubyte"),
        ({"dataset": {"name": "digits", "val": 1.5}}, "dataset.val"),
        ({"model__checkpoint": str(tmp_path / "r18.pt")},
         "holds a resnet18, the space's model is resnet_digits"),
        ({"model__checkpoint": str(tmp_path / "c4.pt")}, "was built for 4 classes"),
        ({"model__checkpoint": str(tmp_path / "broken.pt")},
         "broken.pt: not a loadable weights-only checkpoint"),
        # digits trains on 1,077 samples: a calibration split must leave some for the spaces
        ({"params__calibration": 1077}, "params.calibration: 1077 holds out 1077 of the 1077 "
                                        "training samples"),
    ]
    for updates, message in cases:
        path = _space_with(tmp_path, **updates)
        assert main(["--space", str(path), *args]) == 2, updates
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (updates, err)
    assert not (tmp_path / "s").exists()


def test_the_training_suite_is_what_the_space_says_in_the_driver_and_in_each_trial(tmp_path):
    """Unset keys keep the suite's own defaults (AttackSuite); a trial rebuilds the spec from
    its JSON and gets the same suite, so the budget the parent run shows is what ran."""
    from orchestrator.space import SweepSpec

    path = tmp_path / "s.yaml"
    path.write_text(TRAINING)
    spec = load_space(path, check_model=False)
    suite = spec.attack.attack_suite()
    assert (suite.apgd_steps, suite.apgd_restarts, suite.targets) == (100, 1, 3)
    assert (suite.square_queries, suite.steps) == (1000, 20)
    assert SweepSpec(**spec.as_dict()).attack.attack_suite() == suite  # as in a trial
    path.write_text(variant({"attack": {"eps": 0.1, "steps": 10, "suite": {
        "targets": 9, "square_queries": 5000, "square_restarts": 2}}}, base=TRAINING))
    spec = load_space(path, check_model=False)
    suite = spec.attack.attack_suite()
    assert SweepSpec(**spec.as_dict()).attack.attack_suite() == suite
    assert (suite.apgd_steps, suite.targets, suite.steps) == (100, 9, 10)
    assert suite.described() == {"pgd": "10 steps x 1", "apgd_ce": "100 steps x 2",
                                 "apgd_t": "9 targets x 100 steps x 2",
                                 "square": "5000 queries x 2"}


@pytest.mark.parametrize("base", [GOOD, TRAINING])
def test_a_full_dump_of_a_space_loads_again(tmp_path, base):
    """as_dict writes every field, the other family's attack defaults included: they are
    defaults, not settings, so the dump loads to the same spec."""
    path = tmp_path / "s.yaml"
    path.write_text(base)
    spec = load_space(path, check_model=False)
    path.write_text(yaml.safe_dump(spec.as_dict()))
    assert load_space(path, check_model=False) == spec


def test_ibp_recipes_compared_on_a_model_of_the_users_own(tmp_path):
    """The recipes on a model that takes no batch norms: fast_ibp with batch_norm false is
    valid, and under random search the grid of recipes runs num_samples of each."""
    path = tmp_path / "space.yaml"
    path.write_text(variant(
        {"family": "ibp", "model": {"name": "resnet_digits"},
         "params": {"eps_train": 0.1, "objective": {"grid": {
             "ibp": {}, "crown_ibp": {}, "fast_ibp": {"batch_norm": False,
                                                     "fast_reg": {"uniform": [0.1, 1.0]}}}}},
         "search": {"algorithm": "random", "num_samples": 2},
         "optimize": {"verified_accuracy": "max"}}, base=TRAINING))
    spec = load_space(path, check_model=False)
    assert spec.trial_count == 6
    assert spec.searched_names() == ["fast_reg", "objective"]


def test_the_attack_race_needs_a_first_rung_below_the_val_split(tmp_path):
    """Without attack.samples the race attacks the whole val split (360 digits): a first rung
    at or above it is found once the data is read, before anything runs."""
    path = tmp_path / "space.yaml"
    path.write_text(variant({"scheduler": {"name": "mo_asha", "grace_period": 360},
                             "attack": {"eps": 0.1}}))
    load_space(path)  # the split's size is not known from the space alone
    with pytest.raises(SpaceError, match=r"scheduler.grace_period: 360 is at or above the 360 "
                                         r"attack samples of the val split"):
        load_space(path, check_data=True)


def test_the_command_line_answers_before_the_heavy_imports():
    """``search.py --help`` and a bad flag need no torch, Ray, MLflow or Optuna."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys; from orchestrator.arguments import parse_args; "
            "parse_args(['--space', 'demo']); "
            "print([m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, check=True)
    assert done.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "search.py", "--help"], capture_output=True,
                            text=True, cwd=root)
    assert helped.returncode == 0 and "--space SPACE" in helped.stdout
    assert "certified_mnist5k" in helped.stdout  # the shipped spaces, listed
