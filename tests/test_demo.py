"""The built-in demo: shipped teacher and classifier are sane, the metrics are right, dmd-demo writes its folder."""

import json
import os

import numpy as np
import pytest
import torch

from decoupled_dmd.demo.data import DIGIT_WORDS, demo_prompts, load_heldout, prompt_label
from decoupled_dmd.demo.metrics import Evaluator, frechet_distance, teacher_samples
from decoupled_dmd.demo.models import TEACHER_DIR, load_classifier, teacher_info
from decoupled_dmd.demo.worlds import flow_timesteps_matching_sdxl, shifted_flow_timesteps


def test_prompts_name_their_digit():
    assert demo_prompts()[7] == "a handwritten digit seven"
    assert [prompt_label(p) for p in demo_prompts()] == list(range(10))
    with pytest.raises(ValueError, match="names no digit"):
        prompt_label("a photo of the cat")
    assert len(DIGIT_WORDS) == 10


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    sigma = a @ a.T + np.eye(4)
    mu = rng.normal(size=4)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(16.0, abs=1e-6)  # 4 dims x 2^2
    # two isotropic Gaussians: d * (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance(mu, 4.0 * np.eye(4), mu, np.eye(4)) == pytest.approx(4.0, abs=1e-6)


def test_student_grids_match_sdxl_snr_and_shift():
    assert flow_timesteps_matching_sdxl(1) == [999]
    grid = flow_timesteps_matching_sdxl(4)
    assert grid[0] == 999 and grid == sorted(grid, reverse=True) and 300 < grid[-1] < 500
    assert shifted_flow_timesteps(4, 3.0) == [999, 900, 750, 500]
    assert shifted_flow_timesteps(4, 1.0) == [999, 750, 500, 250]


def test_shipped_classifier_is_accurate_on_held_out_mnist():
    images, labels = load_heldout()
    assert images.shape[1:] == (1, 28, 28) and images.min() >= -1 and images.max() <= 1
    classifier = load_classifier()
    with torch.no_grad():
        predictions = classifier(torch.from_numpy(images)).argmax(1).numpy()
    assert (predictions == labels).mean() > 0.97


def test_shipped_teacher_loads_as_a_builtin_and_guidance_matters():
    from decoupled_dmd.trainer.api import load_teacher

    adapter = load_teacher("builtin:mnist")
    assert adapter.family == "flow" and adapter.prediction_type == "flow" and adapter.vae is None
    assert adapter.default_resolution == (28, 28) and adapter.latent_channels == 1
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(TEACHER_DIR) for f in files)
    assert size < 4 * 1024 ** 2, "the shipped teacher should stay a few MB"
    info = teacher_info()
    guidance = info["guidance_scale"]
    # The shipped study (50 steps, 100 samples per scale) and a fast re-check here (12 Euler steps).
    study = info["reference"]
    assert study[f"cfg_{guidance:g}"]["adherence"] > study["cfg_1"]["adherence"] + 0.1
    prompts = [p for p in demo_prompts() for _ in range(3)]
    evaluator = Evaluator()
    guided = evaluator(teacher_samples(adapter, prompts, 3, guidance, steps=12), prompts)
    unguided = evaluator(teacher_samples(adapter, prompts, 3, 1.0, steps=12), prompts)
    assert guided["adherence"] > unguided["adherence"] + 0.05
    assert guided["top1"] > 0.7


def test_dmd_demo_writes_its_results_folder(tmp_path):
    from decoupled_dmd.demo.run import DEMO_SETTINGS, demo_main

    out = tmp_path / "demo"
    assert demo_main(["--world", "mnist", "--output_dir", str(out), "--max_train_steps", "2", "--eval_per_prompt", "1",
                      "--teacher_steps", "2", "--train_batch_size", "2", "--threads", "1"]) == 0
    for name in ("grid.png", "curves.png", "metrics.json", "student.safetensors", "samples.npz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["train_steps"] == 2 and summary["student_timesteps"] == flow_timesteps_matching_sdxl(4)
    assert summary["settings"]["renoise_schedule"] == DEMO_SETTINGS["renoise_schedule"]
    for row in ("student", "teacher_equal_calls", "teacher_double_calls", "teacher_4x_calls", "teacher_50_steps_cfg"):
        metrics = summary["metrics"][row]
        for key in ("adherence", "top1", "frechet", "image_mean", "image_var", "saturation"):
            assert np.isfinite(metrics[key]), (row, key)
        assert 0 <= metrics["adherence"] <= 1
    assert summary["metrics"]["noise_floor_frechet"] > 0
    calls = {row: summary["metrics"][row]["calls"] for row in ("student", "teacher_equal_calls", "teacher_double_calls",
                                                               "teacher_4x_calls")}
    assert calls == {"student": 4, "teacher_equal_calls": 4, "teacher_double_calls": 8, "teacher_4x_calls": 16}
    assert summary["metrics"]["teacher_equal_calls"]["steps"] == 2 and summary["world"] == "mnist"
    protocol = summary["protocol"]  # MNIST has no held-out prompts: the record says so
    assert protocol["split"] == "test" and protocol["held_out"] is False
    assert set(protocol["n_per_row"].values()) == {10}
    assert np.isfinite(summary["metrics"]["student"]["frechet_real"])
    with np.load(out / "samples.npz") as samples:
        assert samples["student"].shape == (10, 1, 28, 28) and len(samples["prompts"]) == 10
        assert np.abs(samples["student"]).max() <= 1.0
    from decoupled_dmd.trainer.api import read_student_metadata

    assert read_student_metadata(str(out / "student.safetensors"))["decoupled_dmd.family"] == "flow"


def test_dmd_demo_stops_on_ctrl_c_saves_and_still_writes_its_results(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from decoupled_dmd.demo.run import demo_main; sys.exit(demo_main())",
         "--world", "mnist", "--output_dir", str(out), "--max_train_steps", "500", "--eval_per_prompt", "1",
         "--teacher_steps", "2",
         "--train_batch_size", "2", "--threads", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    started = time.time()
    while not (out / "training" / "logs" / "metrics.jsonl").is_file() and time.time() - started < 240:
        time.sleep(0.5)  # the first update is logged: training runs
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "results go to" in stderr and "stopped at update" in stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert 1 <= summary["train_steps"] < 500
    assert any(p.name.startswith("state-") for p in (out / "training").iterdir())


def test_student_trajectory_is_the_trainers_sampler_step_by_step():
    from decoupled_dmd.demo.experiment import student_trajectory
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
    from decoupled_dmd.trainer.sampling import few_step_sample, student_levels

    adapter = DiffusersAdapter.from_pretrained(TEACHER_DIR)
    levels = student_levels(adapter.schedule, [999, 749, 499])
    noise = torch.randn(2, *adapter.latent_shape(28, 28), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(demo_prompts()[:2])
    with torch.no_grad():
        steps = student_trajectory(adapter.denoiser(), noise, levels, cond, torch.Generator().manual_seed(1))
        final = few_step_sample(adapter.denoiser(), noise, levels, cond, generator=torch.Generator().manual_seed(1))
        first = adapter.denoiser()(noise, torch.full((2,), levels[0], dtype=torch.float64), cond)
    assert len(steps) == 3 and torch.equal(steps[-1], final) and torch.equal(steps[0], first)


def test_teacher_rows_from_the_second_process_equal_those_sampled_here_and_a_failed_process_falls_back():
    import torch

    from decoupled_dmd.demo.teacher_rows import TeacherRows, sample_rows
    from decoupled_dmd.demo.worlds import get_world

    world = get_world("mnist")
    prompts = world.grid_prompts()[:3]
    spec = {"teacher_dir": world.teacher_dir, "guidance": 3.0,
            "rows": {"ddim": {"prompts": prompts, "seed": 5, "steps": 2, "solver": None},
                     "dpm": {"prompts": prompts, "seed": 6, "steps": 2, "solver": "dpmpp_2m"}}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = sample_rows(spec)
        background = TeacherRows(spec).start()
        assert background.process is not None
        rows = background.result()
        assert set(rows) == {"ddim", "dpm"} and all(torch.equal(rows[k], here[k]) for k in here)
        assert not os.path.exists(background._folder)  # its file is cleaned up
        failed = TeacherRows(spec).start()
        failed.process.terminate()
        failed.process.join()
        assert all(torch.equal(v, here[k]) for k, v in failed.result().items())  # sampled here instead
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
