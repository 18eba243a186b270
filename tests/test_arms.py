"""Arms over training seeds (research/arms.py): every arm is a valid recipe, the report's paired tests are the
hand-computed ones, a run trains the real trainer and stores what a report needs, and the comparison with the
teacher's rows is paired."""

import json
import math
import os

import numpy as np
import pytest

from decoupled_dmd.research import arms


def test_seeds_parse_and_every_arm_is_a_valid_recipe(tmp_path):
    from decoupled_dmd.demo.experiment import make_config

    assert arms.parse_seeds("0-4") == [0, 1, 2, 3, 4] and arms.parse_seeds("0,3, 7-8") == [0, 3, 7, 8]
    for arm in arms.ARMS:
        settings = arms.arm_settings(arm, 3)
        config = make_config(str(tmp_path), str(tmp_path / "p.txt"), settings, world="texture")  # validates
        assert config.seed == 3
    assert len(arms.arm_settings("8 steps", 0)["student_timesteps"]) == 8
    assert arms.arm_settings("1 step", 0, max_train_steps=7)["max_train_steps"] == 7
    only = make_config(str(tmp_path), str(tmp_path / "p.txt"), arms.arm_settings("regression only", 0), world="texture")
    assert only.regression_only and not only.uses_fake_model
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        arms.arm_settings("nope", 0)
    with pytest.raises(ValueError, match="training seed"):
        arms.arm_settings("shipped", 20_001)  # a test seed never trains
    jobs = arms.plan(["shipped", "CA only"], [0, 1], str(tmp_path))
    assert [(j["arm"], j["seed"]) for j in jobs] == [("shipped", 0), ("CA only", 0), ("shipped", 1), ("CA only", 1)]
    assert [j["memorisation"] for j in jobs] == [True, False, True, False]


def _fake_result(arm, seed, frechet, texture, folder=""):
    split = {"frechet": frechet, "accuracy_texture": texture, "texture_spectrum_accuracy": texture, "top1": 0.5,
             "hf_energy_ratio": 1.0}
    return {"arm": arm, "seed": seed, "steps": 4, "splits": {"test": split, "validation": split}, "folder": folder}


def test_summary_is_a_paired_t_test_over_seeds_by_hand():
    results = {"shipped": {s: _fake_result("shipped", s, f, 0.8) for s, f in zip(range(3), (5.0, 6.0, 7.0))},
               "other": {s: _fake_result("other", s, f, 0.7) for s, f in zip(range(4), (6.0, 8.0, 10.0, 99.0))}}
    table = arms.summarise(results, "test")
    other = table["other"]
    assert other["n_seeds"] == 4 and other["frechet"]["mean"] == pytest.approx(30.75)
    assert other["frechet"]["sd"] == pytest.approx(np.std([6, 8, 10, 99], ddof=1))
    test = other["against_shipped"]["frechet"]  # differences 1, 2, 3 on the three shared seeds
    assert test["n_seeds"] == 3 and test["mean_difference"] == pytest.approx(2.0) and test["sd_difference"] == 1.0
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2)
    assert test["interval"] == pytest.approx((2 - half, 2 + half), abs=1e-4)
    assert test["p_value"] == pytest.approx(0.07418, abs=2e-4)  # two-sided, t = 2 sqrt(3), 2 dof
    assert other["against_shipped"]["accuracy_texture"]["mean_difference"] == pytest.approx(-0.1)
    assert "against_shipped" not in table["shipped"]
    text = arms.markdown(table, "test", "shipped")
    assert "| other | 4 | 4 | 30.75 +- " in text and "+2.00 [" in text and "p = 0.074" in text


def test_against_the_teacher_is_paired_and_sees_a_shift(tmp_path):
    random = np.random.default_rng(0)
    reference = random.normal(size=(400, 4))
    teacher = random.normal(size=(200, 4))
    runs = {}
    for seed, shift in ((0, 0.0), (1, 1.0)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        np.savez(folder / "samples_test.npz", features=teacher + shift)
        runs[seed] = _fake_result("shipped", seed, 1.0, 0.8, str(folder))
    out = arms.against_teacher({"shipped": runs}, "test", {"teacher": teacher}, reference, resamples=50)
    per_seed = out["shipped"]["teacher"]["per_seed"]
    assert per_seed[0]["difference"] == pytest.approx(0.0, abs=1e-9)  # the same samples: no difference at all
    assert per_seed[0]["interval"][0] == pytest.approx(0.0, abs=1e-9) == per_seed[0]["interval"][1]
    assert per_seed[1]["difference"] > 1.0 and per_seed[1]["interval"][0] > 0 and per_seed[1]["student_closer"] == 0


def test_a_run_trains_scores_both_splits_and_resumes_from_its_file(tmp_path):
    """The real trainer on the texture teacher (one update, a few regression pairs), its samples scored on
    both splits and stored; the memorisation check compares pairs with fresh noises; a second call reads the
    file back instead of training again."""
    job = arms.plan(["shipped"], [0], str(tmp_path), max_train_steps=1, per_prompt=1)[0]
    job["settings"].update(regression_pairs=4, regression_teacher_steps=2)
    data = arms.run_arm(job)
    assert set(data["splits"]) == {"validation", "test"} and data["train_steps"] == 1
    for name, metrics in data["splits"].items():
        assert metrics["n"] == 16 and np.isfinite(metrics["frechet"])
        low, high = metrics["frechet_interval"]
        assert low <= metrics["frechet"] <= high
        stored = np.load(os.path.join(job["folder"], f"samples_{name}.npz"))
        assert stored["features"].shape == (16, 64) and stored["texture"].mean() == pytest.approx(
            metrics["accuracy_texture"])
    assert data["validation_curve"][-1]["step"] == 1
    check = data["memorisation"]
    assert check["pairs"] == 4 and check["first_step_mse_pairs"] > 0 and check["first_step_mse_fresh"] > 0
    assert os.path.isfile(os.path.join(job["folder"], "student.safetensors"))
    assert not os.path.exists(os.path.join(job["folder"], "training"))  # states dropped
    with open(os.path.join(job["folder"], "result.json"), encoding="utf-8") as handle:
        assert json.load(handle)["seed"] == 0
    assert arms.run_arm(job)["seconds"] == data["seconds"]  # read back, not trained again
    loaded = arms.load_results(str(tmp_path))
    assert list(loaded) == ["shipped"] and list(loaded["shipped"]) == [0]


def test_quality_rows_put_the_students_on_one_line_with_their_seed_spread(tmp_path):
    from decoupled_dmd.demo.plots import save_quality_against_calls

    results = {arm: {s: dict(_fake_result(arm, s, 10.0 / steps + s, 0.8), steps=steps) for s in range(3)}
               for arm, steps in (("1 step", 1), ("shipped", 4), ("CA only", 4))}
    table = arms.summarise(results, "test")
    solvers = {"dpmpp_2m 4 steps (8 calls)": {"calls": 8, "frechet": 6.0, "frechet_interval": [5.0, 7.0],
                                              "accuracy_texture": 0.8},
               "dpmpp_2m 8 steps (16 calls)": {"calls": 16, "frechet": 2.0, "frechet_interval": [1.5, 2.5],
                                               "accuracy_texture": 0.84}}
    rows = arms.quality_rows(table, solvers)
    students = {k: v for k, v in rows.items() if k.startswith("student")}
    assert sorted(v["calls"] for v in students.values()) == [1, 4]  # the step arms only, not the controls
    one = rows["student 1 steps (1 calls)"]
    assert one["frechet"] == pytest.approx(11.0) and one["frechet_sd"] == pytest.approx(1.0)
    assert len({v["line"] for v in students.values()}) == 1
    path = save_quality_against_calls(rows, str(tmp_path / "plot.png"), floor=1.2)
    assert os.path.getsize(path) > 10_000


def test_stop_curves_average_each_checkpoint_over_seeds():
    runs = {}
    for seed, values in enumerate(((8.0, 4.0), (10.0, 6.0))):
        result = _fake_result("shipped", seed, 1.0, 0.8)
        result["validation_curve"] = [{"step": 25, "frechet": values[0], "accuracy_texture": 0.7},
                                      {"step": 50, "frechet": values[1], "accuracy_texture": 0.8}]
        runs[seed] = result
    curves = arms.stop_curves({"shipped": runs})
    assert curves["shipped"][25]["frechet"] == (9.0, pytest.approx(math.sqrt(2)), 2)
    assert curves["shipped"][50]["accuracy_texture"][0] == pytest.approx(0.8)
    text = arms.curves_markdown(curves)
    assert "| shipped | 9.00 +- 1.41, tex 0.700 (n 2) | 5.00 +- 1.41, tex 0.800 (n 2) |" in text
