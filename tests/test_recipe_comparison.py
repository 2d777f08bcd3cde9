"""benchmarks.recipe_comparison: each recipe's operating point is chosen on validation, and
its test figures are what the table reports, against the baseline's."""

import csv

import pytest

from benchmarks.recipe_comparison import main, operating_points, table


def _row(name, i, val, nominal, test, n=1000):
    row = {"trial_id": f"{name}{i}", "objective": name, "eps_train": "0.15", "warmup": "75",
           "verified_accuracy": str(val), "nominal_accuracy": str(nominal),
           "test_samples": str(n)}
    for metric, value in (("verified_accuracy", test), ("nominal_accuracy", nominal - 0.01),
                          ("robust_accuracy", test + 0.02), ("verified_ibp_accuracy", test),
                          ("verified_crown_accuracy", test - 0.01)):
        row.update({f"test_{metric}": str(value), f"test_{metric}_ci_low": str(value - 0.02),
                    f"test_{metric}_ci_high": str(value + 0.02)})
    return row


ROWS = [_row("ibp", 0, 0.90, 0.94, 0.80),  # the most verified, but below the nominal floor
        _row("ibp", 1, 0.88, 0.96, 0.87), _row("ibp", 2, 0.85, 0.97, 0.86),
        _row("fast_ibp", 0, 0.93, 0.96, 0.92), _row("fast_ibp", 1, 0.93, 0.97, 0.91),
        _row("crown_ibp", 0, 0.95, 0.90, 0.94)]


def test_the_operating_point_is_chosen_on_validation_never_on_test():
    points = operating_points(ROWS, 0.95)
    assert points["ibp"]["row"]["trial_id"] == "ibp1"  # not ibp0 (nominal 0.94 < 0.95)
    assert points["fast_ibp"]["row"]["trial_id"] == "fast_ibp1"  # tie: the more nominal
    assert points["crown_ibp"]["row"] is None and points["crown_ibp"]["best_nominal"] == 0.90
    text = table(points, 0.95, "ibp").splitlines()
    assert text[2].startswith("| ibp | 3 | eps_train 0.15, warmup 75 | 0.880 / 0.960 | 0.950")
    assert "| 0.870 (0.85-0.89) |" in text[2] and "| 0.020 |" in text[2]
    fast = next(line for line in text if line.startswith("| fast_ibp"))
    assert fast.endswith("| +0.040 (+0.01 to +0.07) |")  # 0.91 - 0.87 on 1,000 samples each
    assert "no trial at val nominal >= 0.95 (best 0.900)" in text[-1] or any(
        "no trial at val nominal >= 0.95 (best 0.900)" in line for line in text)
    # with each recipe's per-sample outcomes, the difference is the paired one
    outcomes = {"ibp": [True] * 870 + [False] * 130, "fast_ibp": [True] * 910 + [False] * 90}
    paired = next(line for line in table(points, 0.95, "ibp", outcomes).splitlines()
                  if line.startswith("| fast_ibp"))
    assert paired.endswith("| +0.040 (+0.03 to +0.05) paired |")  # every gain on one side
    with pytest.raises(ValueError, match="--baseline pgd: not an objective of the sweep"):
        table(points, 0.95, "pgd")


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_the_command_reads_a_csv_and_bad_input_is_exit_2(tmp_path, capsys):
    assert main(["--csv", _write(tmp_path / "pareto_front.csv", ROWS)]) == 0
    assert "| fast_ibp | 2 |" in capsys.readouterr().out
    untested = [{k: v for k, v in r.items() if not k.startswith("test_")} for r in ROWS]
    assert main(["--csv", _write(tmp_path / "untested.csv", untested)]) == 2
    assert "objective ibp: its chosen trial ibp1 has no test figures" in capsys.readouterr().err
    assert main(["--csv", str(tmp_path / "missing.csv")]) == 2
