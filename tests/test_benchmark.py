"""dmd-benchmark in a tiny configuration: the real trainer runs, tables, gates and plots are written."""

import json

import pytest

from decoupled_dmd.research.benchmark import MODES, VARIANTS, benchmark_main, plan_jobs
from decoupled_dmd.research.cost import cost_markdown, measure_case, naive_estimate_bytes


def test_plans_cover_the_papers_ablations():
    full = plan_jobs(MODES["full"], "out", "sdxl")
    names = {(job["steps"], job["name"]) for job in full}
    assert {(4, name) for name in VARIANTS} <= names
    assert (1, "decoupled-constrained") not in names  # equal to decoupled-full when t = 0
    schedules = [name for name, (group, _) in VARIANTS.items() if group == "schedule"]
    assert {(2, name) for name in schedules} <= names and (2, "CA only") not in names  # Table 1 at 2 steps
    assert len(full) == 3 * (len(VARIANTS) + 4 + 4)
    assert all(MODES["full"]["seeds"] >= 3 for _ in [0])
    settings = {job["name"]: job["settings"] for job in full if job["steps"] == 4 and job["seed"] == 0}
    assert settings["DM only"]["cfg_augmentation"] is False
    assert settings["CA only"]["regularizer"] == "none"
    assert settings["CA + mean-variance KL"]["regularizer"] == "mean_variance"
    assert settings["normalization none"]["update_normalization"] == "none"
    assert len({tuple(job["settings"]["student_timesteps"]) for job in full if job["steps"] == 4}) == 1


def test_tiny_benchmark_writes_table_gates_and_plots(tmp_path):
    out = tmp_path / "bench"
    tiny = ["--student_steps", "4", "--seeds", "1", "--max_train_steps", "2", "--eval_every", "1",
            "--eval_per_prompt", "1", "--train_batch_size", "2", "--jobs", "1", "--skip_cost", "--skip_ca_share"]
    code = benchmark_main(["--output_dir", str(out), "--variants", "decoupled-hybrid,DM only", *tiny])
    assert code == 0
    report = (out / "benchmark.md").read_text()
    assert "| decoupled-hybrid | schedule |" in report and "| DM only | regularizer |" in report
    assert "train_batch_size" not in report and "Noise floor" in report
    assert "## Gates" in report and "Per student step" in report and "Same input, per student step" in report
    quality = json.loads((out / "quality.json").read_text())
    row = quality["summary"]["rows"]["4|decoupled-hybrid"]
    assert row["seeds"] == 1 and 0 <= row["adherence"][0] <= 1 and row["frechet"][0] > 0
    assert row["frechet_real"][0] > 0 and [e["step"] for e in row["same_input"]] == [1, 2, 3, 4]
    assert all(e["teacher_cfg_frechet"] > 0 for e in row["same_input"])
    assert quality["summary"]["gates"] == []  # no coupled / CA-only run to compare with
    assert quality["mode"]["train_batch_size"] == 2
    for name in ("4step_regularizer.png", "4step_per_student_step.png"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "runs" / "4step" / "decoupled-hybrid" / "seed0" / "result.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [0, 1, 2]
    # a second call reuses the stored runs instead of training again
    stored = (out / "runs" / "4step" / "decoupled-hybrid" / "seed0" / "result.json").stat().st_mtime
    assert benchmark_main(["--output_dir", str(out), "--variants", "decoupled-hybrid", *tiny]) == 0
    assert (out / "runs" / "4step" / "decoupled-hybrid" / "seed0" / "result.json").stat().st_mtime == stored


def test_ca_share_section_comes_first_and_covers_both_worlds(tmp_path):
    out = tmp_path / "bench"
    code = benchmark_main(["--output_dir", str(out), "--skip_quality", "--skip_cost", "--skip_speed",
                           "--ca_samples", "16", "--ca_levels", "5"])
    assert code == 0
    report = (out / "benchmark.md").read_text()
    assert report.index("CA share above each student input level") < report.index("Total time")
    shares = json.loads((out / "ca_share.json").read_text())
    assert set(shares) == {"mnist", "texture"}
    for world, result in shares.items():
        rows = result["student_steps"]
        assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[0]["raw_share"] == 1.0, world
        assert 0 < rows[3]["raw_share"] < rows[2]["raw_share"] < rows[1]["raw_share"] < 1, world
        assert f"**{world}**" in report
    assert shares["texture"]["student_steps"][3]["timestep"] == 249
    assert (out / "ca_share.png").stat().st_size > 0


def test_cost_measurement_of_lora_mode_on_the_demo_teacher(tmp_path):
    result = measure_case({"case": "tiny", "mode": "lora", "steps": 1, "threads": 1,
                           "output_dir": str(tmp_path / "cost")})
    assert result["seconds_per_step"] > 0 and result["peak_rss"] >= result["rss_after_load"] > 0
    assert 0 < result["trainable_parameters"] < result["parameters"]
    fake_full = dict(result, mode="full", peak_rss=result["rss_before_model"] + 10 * result["weight_bytes"])
    activations = {"case": "tiny", "mode": "activations", "activation_bytes": 1000, "weight_bytes": 1}
    skipped = {"case": "sdxl", "mode": "full", "weight_bytes": 10, "skipped": "needs at least 1 GiB"}
    table = cost_markdown({"results": [activations, result, fake_full, skipped]})
    assert "| tiny |" in table and "LoRA / full" in table and "needs at least" in table
    assert naive_estimate_bytes(10) == 90


@pytest.mark.parametrize("bad", ["nope", "coupled-shared,nope"])
def test_unknown_variant_fails_naming_the_choices(bad, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark_main(["--output_dir", str(tmp_path), "--variants", bad, "--skip_cost"])
    assert "decoupled-hybrid" in capsys.readouterr().err


def test_a_runs_score_is_the_mean_of_its_late_evaluations():
    """One checkpoint of an oscillating run is a lottery: the score averages the last third of training."""
    from decoupled_dmd.research.benchmark import late_mean, late_steps

    history = [{"step": 0, "frechet": 900.0}, {"step": 20, "frechet": 1.0}, {"step": 40, "frechet": 2.0},
               {"step": 60, "frechet": 4.0, "name": "x"}]
    assert late_mean(history) == {"step": 50.0, "frechet": 3.0}  # steps 40 and 60, never step 0
    assert late_mean(history[:1]) == {"step": 0.0, "frechet": 900.0}
    assert late_steps({"max_train_steps": 60, "eval_every": 10}) == "40, 50, 60"
    assert late_steps({"max_train_steps": 80, "eval_every": 20}) == "60, 80"


def test_a_stored_run_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    from decoupled_dmd.demo import experiment
    from decoupled_dmd.research import runs

    folder = tmp_path / "run"
    folder.mkdir()
    stored = {"name": "x", "settings": {"learning_rate": 3e-5, "student_timesteps": [999, 499], "seed": 0},
              "history": [{"step": 0, "frechet": 1.0}]}
    (folder / "result.json").write_text(json.dumps(stored))
    job = {"name": "x", "steps": 2, "seed": 0, "folder": str(folder), "eval_every": 1, "eval_per_prompt": 1,
           "settings": {"learning_rate": 3e-5, "student_timesteps": (999, 499)}}
    assert runs.run_job(job) == stored

    trained = []
    monkeypatch.setattr(experiment, "run_distillation", lambda *args, **kwargs: trained.append(args[1]) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # another setting (here a new key): the run is trained again
        runs.run_job(dict(job, settings=dict(job["settings"], lr_warmup_steps=10)))
    assert trained == [{"learning_rate": 3e-5, "student_timesteps": (999, 499), "lr_warmup_steps": 10}]
