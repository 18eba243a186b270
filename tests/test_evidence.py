"""The evaluation protocol (held-out prompts, disjoint seed sets), its statistics, the teacher's solvers and the
texture instrument's classifier-free cross-check."""

import math

import numpy as np
import pytest
import torch

from decoupled_dmd.demo.protocol import (
    SEED_RANGES,
    TEST,
    VALIDATION,
    Split,
    check_protocol,
    check_training_seed,
)
from decoupled_dmd.demo.stats import effective_rank, paired_bootstrap_frechet, paired_seed_test, seeds_needed
from decoupled_dmd.demo.texture import (
    ATTRIBUTES,
    all_prompts,
    evaluation_prompts,
    parse_prompt,
    read_texture,
    render_layout,
    sample_world,
    texture_spectrum,
    training_prompts,
)


# --- protocol -----------------------------------------------------------------------------------------------------
def test_held_out_prompts_are_never_trained_but_every_attribute_value_is():
    held_out, trained = evaluation_prompts(), training_prompts()
    assert len(held_out) == 16 and len(trained) == 32
    assert not set(held_out) & set(trained) and set(held_out) | set(trained) == set(all_prompts())
    parsed = [parse_prompt(p) for p in trained]
    for name, values in ATTRIBUTES.items():
        assert {p[name] for p in parsed} == set(range(len(values))), name
    # each held-out combination's colour-texture pair is trained with the other two shapes
    for prompt in held_out:
        asked = parse_prompt(prompt)
        shapes = {p["shape"] for p in parsed if (p["colour"], p["texture"]) == (asked["colour"], asked["texture"])}
        assert shapes == {0, 1, 2} - {asked["shape"]}


def test_the_texture_world_trains_on_its_training_prompts_and_evaluates_held_out_ones():
    from decoupled_dmd.demo.worlds import get_world

    world = get_world("texture")
    assert world.prompts() == training_prompts()
    assert not set(world.evaluation_prompts(2)) & set(world.prompts())


def test_seed_ranges_are_disjoint_and_splits_check_their_seeds():
    ranges = list(SEED_RANGES.values())
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start
    assert VALIDATION.noise_seed != VALIDATION.reference_seed and TEST.noise_seed in SEED_RANGES["test"]
    with pytest.raises(ValueError, match="outside the test seeds 20000..29999"):
        Split("test", noise_seed=10_001, reference_seed=20_000)
    assert check_training_seed(7) == 7
    with pytest.raises(ValueError, match="outside the training seeds"):
        check_training_seed(20_001)


def test_the_protocol_record_is_checkable():
    held_out, trained = evaluation_prompts(), training_prompts()
    record = TEST.record(held_out * 2, trained, {"student": 32, "dpmpp_2m 4 steps (8 calls)": 32})
    assert record["held_out"] and record["evaluated_prompts"] == held_out and check_protocol(record) == []
    leaky = TEST.record(held_out + trained[:1], trained, {"a": 17, "b": 16})
    problems = check_protocol(leaky)
    assert any("overlap" in p for p in problems) and any("different n" in p for p in problems)
    assert any("reference_seed" in p for p in check_protocol({**record, "reference_seed": 5}))


# --- statistics -------------------------------------------------------------------------------------------------
def test_effective_rank_by_hand():
    assert effective_rank(np.diag([1.0, 0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(np.eye(5)) == pytest.approx(5.0)
    # eigenvalues 3 and 1: p = (0.75, 0.25), exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    assert effective_rank(rotation @ np.diag([3.0, 1.0]) @ rotation.T) == pytest.approx(1.7548, abs=1e-4)


def test_paired_t_test_and_power_by_hand():
    result = paired_seed_test([3, 4, 5, 6, 9], [1, 2, 2, 3, 4])
    # differences 2, 2, 3, 3, 5: mean 3, sd sqrt(1.5); t = 3 / (sqrt(1.5) / sqrt(5)) = 5.477, 4 dof
    assert result["mean_difference"] == 3.0 and result["sd_difference"] == pytest.approx(math.sqrt(1.5))
    assert result["p_value"] == pytest.approx(0.005408, abs=2e-6)  # scipy.stats.ttest_rel
    half = 2.776445 * math.sqrt(1.5) / math.sqrt(5)  # t(0.975, 4)
    assert result["interval"] == pytest.approx((3 - half, 3 + half), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_seed_test([1.0], [2.0])
    # effect size 1 at 80% power, alpha 0.05: about 10 pairs; half the effect needs about four times as many
    assert 10 <= seeds_needed(1.0, 1.0) <= 11
    assert 33 <= seeds_needed(0.5, 1.0) <= 36


def test_paired_bootstrap_sees_a_real_shift_and_not_a_null_one():
    random = np.random.default_rng(0)
    reference = random.normal(size=(400, 4))
    same, shifted = random.normal(size=(400, 4)), random.normal(size=(400, 4)) + 0.5
    draws = paired_bootstrap_frechet({"same": same, "shifted": shifted}, reference, resamples=50)
    assert (draws["shifted"] > draws["same"]).all()
    assert np.median(draws["shifted"]) == pytest.approx(4 * 0.25, rel=0.35)  # ||mu||^2 = 4 x 0.5^2
    with pytest.raises(ValueError, match="equal n"):
        paired_bootstrap_frechet({"a": same, "b": shifted[:10]}, reference)


# --- the classifier-free texture reader ---------------------------------------------------------------------------
def test_the_spectrum_reader_reads_renders_at_any_phase_and_any_contrast():
    images, _, attributes = sample_world(400, seed=31)
    assert (read_texture(images) == attributes["texture"]).float().mean() > 0.95
    shifted = torch.roll(images, shifts=(1, 3), dims=(2, 3))  # marks off the grid phase
    assert (read_texture(shifted) == attributes["texture"]).float().mean() > 0.95
    from decoupled_dmd.demo.texture import draw_layout

    generator = torch.Generator().manual_seed(3)
    layout = draw_layout(400, generator)
    faint = render_layout(attributes, layout, texture_contrast=torch.full((400,), 0.2))
    assert (read_texture(faint) == attributes["texture"]).float().mean() > 0.9
    dots = texture_spectrum(images[attributes["texture"] == 2])
    assert dots[:, 0].mean() > 10 * dots[:, 1].mean()  # dots put their power in the dots band


def test_the_instrument_is_trained_on_perturbed_renders():
    from decoupled_dmd.research.training import augment_texture_images

    images, _, _ = sample_world(16, seed=2)
    generator = torch.Generator().manual_seed(0)
    out = augment_texture_images(images, generator)
    assert out.shape == images.shape and not torch.equal(out, images)
    calm = augment_texture_images(images, torch.Generator().manual_seed(0), max_shift=0, max_blur=0.0,
                                  max_noise=0.0)
    assert torch.equal(calm, images)  # nothing drawn: nothing changes
    only_shift = augment_texture_images(images, torch.Generator().manual_seed(1), max_blur=0.0, max_noise=0.0)
    # a pure shift: every image equals some whole-pixel translation of its render (edges replicated)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3), mode="replicate")
    for k in range(4):
        assert any(torch.equal(only_shift[k], padded[k, :, dy:dy + 32, dx:dx + 32])
                   for dy in range(7) for dx in range(7))


# --- the teacher's solvers ----------------------------------------------------------------------------------------
def test_diffusers_ddim_on_the_denoiser_contract_equals_a_hand_ddim():
    from decoupled_dmd.demo.solvers import make_scheduler, solver_sample
    from decoupled_dmd.demo.worlds import get_world
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter, read_scheduler_config
    from decoupled_dmd.trainer.losses import classifier_free_guidance

    world = get_world("texture")
    adapter = DiffusersAdapter.from_pretrained(world.teacher_dir)
    config = read_scheduler_config(world.teacher_dir, True)
    teacher = adapter.denoiser()
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    cond, uncond = adapter.encode_prompts(evaluation_prompts()[:2]), adapter.encode_prompts(["", ""])
    scheduler = make_scheduler("ddim", config)
    out = solver_sample(teacher, scheduler, noise, cond, uncond, 3.0, 3)
    assert scheduler.timesteps.tolist() == [999, 666, 332]  # trailing: starts at the noisiest timestep
    # by hand: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps, with diffusers' DDIM stepping down by a fixed
    # 1000 // 3 = 333 (so 666 -> 333, though the next call is at 332) and the last step to ab[0]
    ab = adapter.schedule.alphas_cumprod.double()
    x = noise.double()
    for t, prev in ((999, 666), (666, 333), (332, 0)):
        level = adapter.schedule.level(torch.tensor([float(t)] * 2, dtype=torch.float64))
        x0 = classifier_free_guidance(teacher(x.float(), level, cond), teacher(x.float(), level, uncond), 3.0).double()
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x = ab[prev].sqrt() * x0 + (1 - ab[prev]).sqrt() * eps
    assert torch.allclose(out.double(), x, atol=1e-4)
    for solver in ("euler", "dpmpp_2m", "unipc"):
        sample = solver_sample(teacher, make_scheduler(solver, config), noise, cond, uncond, 3.0, 4)
        assert sample.shape == noise.shape and torch.isfinite(sample).all(), solver
    with pytest.raises(ValueError, match="choose one of ddim, euler, dpmpp_2m"):
        make_scheduler("heun", config)


# --- the shipped instrument and reference -------------------------------------------------------------------------
def test_the_shipped_instrument_reads_perturbed_renders_and_standardises_its_features():
    from decoupled_dmd.demo.metrics import Evaluator
    from decoupled_dmd.research.training import augment_texture_images

    evaluator = Evaluator(reference_file="", world="texture")
    images, prompts, _ = sample_world(300, seed=4321)
    perturbed = augment_texture_images(images, torch.Generator().manual_seed(5))
    metrics = evaluator(perturbed, prompts)
    for name in ATTRIBUTES:
        assert metrics[f"accuracy_{name}"] > 0.95, name
    _, features = evaluator.classify(images)  # standardised on real renders: about zero mean, unit spread
    assert features.mean(0).abs().mean() < 0.25 and 0.7 < features.std(0).mean() < 1.3


def test_the_shipped_reference_was_built_by_the_shipped_instrument_under_the_protocol():
    import json

    from safetensors import safe_open

    from decoupled_dmd.demo.evidence import file_sha256
    from decoupled_dmd.demo.metrics import Evaluator
    from decoupled_dmd.demo.worlds import get_world

    world = get_world("texture")
    with safe_open(world.reference_file, "pt") as handle:
        metadata = handle.metadata()
        shapes = {k: tuple(handle.get_tensor(k).shape) for k in handle.keys()}
    # retraining the classifier without rebuilding the reference would compare two different feature spaces
    assert metadata["classifier_sha256"] == file_sha256(world.classifier_file)
    assert json.loads(metadata["prompts"]) == evaluation_prompts()
    assert json.loads(metadata["reference_seeds"]) == {"validation": VALIDATION.reference_seed,
                                                       "test": TEST.reference_seed}
    assert shapes == {"validation_features": (512, 64), "test_features": (512, 64)}
    assert float(metadata["effective_rank"]) > 10
    validation, test = Evaluator(world="texture"), Evaluator(world="texture", split="test")
    assert not np.allclose(validation.reference["mu"], test.reference["mu"])
    assert validation.noise_floor(512) == pytest.approx(test.noise_floor(512), rel=0.2)
    assert validation.noise_floor(256) > validation.noise_floor(512) > 0  # a smaller set sits further off


def test_solver_lists_parse_and_rows_state_their_calls():
    from decoupled_dmd.demo.evidence import calls_of, parse_solvers

    assert parse_solvers("dpmpp_2m:2,4,8; ddim:4") == {"dpmpp_2m": (2, 4, 8), "ddim": (4,)}
    with pytest.raises(ValueError, match="write solver:steps"):
        parse_solvers("heun:4")
    assert calls_of("dpmpp_2m 4 steps (8 calls)") == 8 and calls_of("student") is None


def test_recentred_bootstrap_draws_hold_the_estimate():
    from decoupled_dmd.demo.stats import interval, recentre

    draws = np.array([3.0, 3.2, 3.5, 4.0, 2.9])
    centred = recentre(draws, 1.7)
    assert np.median(centred) == pytest.approx(1.7) and np.ptp(centred) == pytest.approx(np.ptp(draws))
    low, high = interval(centred)
    assert low < 1.7 < high
