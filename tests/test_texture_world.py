"""The texture world (procedural data, prompts, shipped teacher and classifier), the world interface, and the
CA-share measurement."""

import os

import numpy as np
import pytest
import torch

from decoupled_dmd.demo.texture import (
    ATTRIBUTES,
    all_prompts,
    evaluation_prompts,
    make_prompt,
    parse_prompt,
    render_prompts,
    sample_world,
    texture_pattern,
)
from decoupled_dmd.demo.worlds import get_world, sdxl_student_timesteps
from decoupled_dmd.research.ca_share import ca_share, share_above


# --- the world ------------------------------------------------------------------------------------------------
def test_prompts_compose_every_attribute_and_parse_back():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 4 * 4 * 3
    assert make_prompt({"colour": 0, "texture": 1, "shape": 0, "background": 1}) == "a red striped circle"
    for prompt in prompts:
        assert make_prompt(parse_prompt(prompt)) == prompt
    with pytest.raises(ValueError, match="texture: one of solid, striped, dotted, checkered"):
        parse_prompt("a red circle")
    with pytest.raises(ValueError, match="colour"):
        parse_prompt("a red green striped circle")


def test_evaluation_prompts_cover_every_colour_and_texture_pair():
    parsed = [parse_prompt(p) for p in evaluation_prompts()]
    assert {(p["colour"], p["texture"]) for p in parsed} == {(c, t) for c in range(4) for t in range(4)}
    assert {p["shape"] for p in parsed} == {0, 1, 2}


def test_the_world_is_seeded_and_in_model_range():
    first, prompts, attributes = sample_world(32, seed=5)
    again, prompts_again, _ = sample_world(32, seed=5)
    other, _, _ = sample_world(32, seed=6)
    assert first.shape == (32, 3, 32, 32)
    assert torch.equal(first, again) and prompts == prompts_again
    assert not torch.equal(first, other)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert prompts[3] == make_prompt({k: v[3] for k, v in attributes.items()})
    assert set(attributes["background"].tolist()) == {0, 1, 2}  # drawn, though no prompt names it


def test_textures_are_fine_and_only_fine():
    # periods of 2 and 4 px on the pixel grid (4 is the UNet's down-sampling stride)
    stripes, dots, checks = (texture_pattern(n) for n in ("striped", "dotted", "checkered"))
    assert torch.equal(stripes, torch.roll(stripes, 4, dims=1)) and not torch.equal(stripes, torch.roll(stripes, 2, 1))
    assert torch.equal(dots, torch.roll(dots, 2, dims=0)) and torch.equal(dots, torch.roll(dots, 2, dims=1))
    assert torch.equal(checks, torch.roll(checks, 4, dims=1)) and dots.mean() == 0.25
    # same shape, colour, place: the textured fills keep the solid fill's mean (nothing coarse tells them apart)
    prompts = [f"a blue {t} square" for t in ATTRIBUTES["texture"]]
    images = torch.cat([render_prompts([p], seed=3) for p in prompts])  # one seed: the same place and jitter
    solid = images[0]
    inside = (solid - images[0, :, :1, :1]).abs().sum(0) > 0.2  # shape pixels: differ from the corner background
    for textured in images[1:]:
        assert abs(textured[:, inside].mean() - solid[:, inside].mean()) < 0.02
        assert (textured - solid).abs().max() > 0.3  # yet every texture has visible marks
    blurred = torch.nn.functional.avg_pool2d(images, 4)
    assert (blurred[1:] - blurred[:1]).abs().mean() < 0.02  # at 4x4 blocks the four fills look the same


# --- the world interface --------------------------------------------------------------------------------------
def test_worlds_give_labels_real_images_and_the_sdxl_grid():
    texture, mnist = get_world("texture"), get_world("mnist")
    prompts = texture.evaluation_prompts(2)
    assert len(prompts) == 32 and prompts[0] == prompts[1]
    labels = texture.labels(prompts[:2])
    assert set(labels) == set(ATTRIBUTES) and labels["texture"].tolist() == [0, 0]
    assert texture.real_images(prompts[:3], seed=1).shape == (3, 3, 32, 32)
    assert texture.student_timesteps(4) == sdxl_student_timesteps(4) == [999, 749, 499, 249]
    assert sdxl_student_timesteps(2) == [999, 499] and sdxl_student_timesteps(1) == [999]
    digits = mnist.evaluation_prompts(3)
    real = mnist.real_images(digits, seed=0)
    assert real.shape == (30, 1, 28, 28)
    assert mnist.labels(digits)["digit"].tolist() == [d for d in range(10) for _ in range(3)]
    assert mnist.student_timesteps(4)[0] == 999
    with pytest.raises(ValueError, match="texture, mnist"):
        get_world("cifar")


# --- the CA share ---------------------------------------------------------------------------------------------
def test_share_above_by_hand():
    levels = [0.0, 1.0, 2.0]
    assert share_above(levels, [0.0, 1.0, 2.0], 1.0) == pytest.approx(1.5 / 2.0)
    assert share_above(levels, [2.0, 2.0, 2.0], 0.5) == pytest.approx(0.75)
    assert share_above(levels, [1.0, 1.0, 1.0], -1.0) == 1.0
    assert share_above(levels, [1.0, 1.0, 1.0], 3.0) == 0.0
    # linear interpolation inside a bin: values 0..2 on [0, 2], from 0.5: (2^2 - 0.5^2) / 2^2
    assert share_above(levels, [0.0, 1.0, 2.0], 0.5) == pytest.approx((4.0 - 0.25) / 4.0)


def test_ca_share_on_a_real_sd_teacher_is_sane(tiny_model_dir):
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter

    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    result = ca_share(adapter, ["a red house", "a blue tree"], 4.0, [999, 749, 499, 249], levels=6, teacher_steps=2)
    assert len(result["levels"]) == len(result["raw"]) == len(result["normalised"]) == 6
    assert result["levels"][0] == pytest.approx(1 - 981 / 1000) and result["levels"][-1] == pytest.approx(0.98)
    assert all(v > 0 and np.isfinite(v) for v in result["raw"] + result["normalised"])
    shares = [row["raw_share"] for row in result["student_steps"]]
    assert shares[0] == 1.0 and all(a >= b for a, b in zip(shares, shares[1:])) and 0 < shares[-1] < 1
    assert result["student_steps"][3]["level"] == pytest.approx(0.751)


# --- the shipped teacher and classifier -------------------------------------------------------------------------
TEXTURE = get_world("texture")


@pytest.mark.skipif(not os.path.isfile(TEXTURE.classifier_file), reason="texture classifier not shipped")
def test_shipped_texture_classifier_reads_every_attribute_of_fresh_images():
    from decoupled_dmd.demo.metrics import Evaluator

    images, prompts, _ = sample_world(200, seed=777)
    evaluator = Evaluator(reference_file="", world="texture")
    metrics = evaluator(images, prompts)
    for name in ATTRIBUTES:
        assert metrics[f"accuracy_{name}"] > 0.95, name
    assert "accuracy_background" not in metrics  # no prompt names it
    floor = evaluator.real_noise_floor(prompts)  # two real sets of these prompts, other seeds
    assert metrics["frechet_real"] < 1.3 * floor  # the same world, another seed: at the floor
    assert 0.8 < metrics["hf_energy_ratio"] < 1.25
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 2), scale_factor=2)
    washed = evaluator(blurred, prompts)
    assert washed["hf_energy_ratio"] < 0.7 and washed["accuracy_texture"] < metrics["accuracy_texture"] - 0.3
    assert washed["frechet_real"] > 3 * floor


@pytest.mark.skipif(not os.path.isdir(TEXTURE.teacher_dir), reason="texture teacher not shipped")
def test_dmd_demo_on_the_texture_world_writes_the_grid_and_the_protocols_comparison(tmp_path):
    import json

    from decoupled_dmd.demo.run import demo_main

    out = tmp_path / "demo"
    assert demo_main(["--world", "texture", "--output_dir", str(out), "--max_train_steps", "2",
                      "--eval_per_prompt", "1", "--teacher_steps", "2", "--train_batch_size", "2",
                      "--threads", "1"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world"] == "texture" and summary["student_timesteps"] == [999, 749, 499, 249]
    metrics = summary["metrics"]
    for row in ("student", "teacher_equal_calls", "teacher_double_calls", "teacher_4x_calls"):
        for key in ("adherence", "accuracy_texture", "texture_spectrum_accuracy", "frechet", "frechet_real",
                    "hf_energy_ratio"):
            assert np.isfinite(metrics[row][key]), (row, key)
        low, high = metrics[row]["frechet_interval"]
        assert low <= high and metrics[row]["n"] == 16
    assert metrics["teacher_double_calls"]["sampler"] == "dpmpp_2m, cfg 3"
    assert metrics["teacher_4x_calls"]["calls"] == 16
    assert "closer_than_student" in metrics["teacher_equal_calls"]
    assert metrics["noise_floor_frechet_real"] > 0
    from decoupled_dmd.demo.protocol import check_protocol

    protocol = summary["protocol"]  # held-out prompts, test seeds, equal n: a script can check it
    assert protocol["split"] == "test" and protocol["held_out"] and check_protocol(protocol) == []
    assert summary["settings"]["seed"] == 0
    with np.load(out / "samples.npz") as samples:
        assert samples["student"].shape == (16, 3, 32, 32)
    from PIL import Image

    with Image.open(out / "grid.png") as grid:
        assert grid.height > grid.width / 4  # eight rows: four per seed


def test_the_texture_teacher_is_an_sd_epsilon_model_on_sdxls_schedule():
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
    from decoupled_dmd.trainer.api import load_teacher
    from decoupled_dmd.trainer.schedules import DiscreteVPSchedule

    adapter = load_teacher("builtin:texture")
    assert isinstance(adapter, DiffusersAdapter) and adapter.prediction_type == "epsilon"
    assert adapter.family == "sd15" and isinstance(adapter.schedule, DiscreteVPSchedule)
    reference = DiscreteVPSchedule.scaled_linear()
    assert torch.allclose(adapter.schedule.alphas_cumprod.double(), reference.alphas_cumprod.double())
    assert adapter.default_resolution == (32, 32)
