"""Algorithm 1 (trainer/method.py) on tiny real models: the re-noise levels, the step weighting, the regression
loss beside the student's update, the regression-only control, every method variant."""

import math
import os

import pytest
import torch
from helpers import PROMPTS, jsonl, make_trainer

from decoupled_dmd.trainer.config import ConfigError, config_from_dict
from decoupled_dmd.trainer.loop import TrainerCallbacks


def test_hybrid_ca_levels_are_cleaner_than_the_student_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, train_batch_size=1)
    for _ in range(12):
        logs = trainer.method.generator_step()
        student_level = trainer.levels[int(logs["student_step"])]
        assert logs["tau_ca"] > student_level
        assert trainer.level_bounds[0] < logs["tau_dm"] <= trainer.level_bounds[1]


@pytest.mark.parametrize("tiny", ["tiny-sd15", "tiny-flow"])
def test_prediction_step_weighting_scales_each_steps_loss_and_gradient(tiny_model_dir, tmp_path, tiny):
    timesteps = [1000, 750, 500, 250] if tiny == "tiny-flow" else [999, 749, 499, 249]
    steps_seen = set()
    for seed in (0, 1, 2):  # one update per pair of fresh trainers: after it their weights (and Adam) differ
        trainers = [make_trainer(tiny_model_dir, tmp_path / f"{mode}{seed}", tiny=tiny, max_grad_norm=0.0, seed=seed,
                                 train_batch_size=1, student_timesteps=timesteps, generator_step_weighting=mode)
                    for mode in ("x0", "prediction")]
        plain, weighted = trainers
        assert torch.equal(plain.step_weights, torch.ones(4, dtype=torch.float64))
        # hand values: d x0 / d prediction is sigma / alpha for eps and sigma for flow; the weights are its
        # inverse, divided by their mean over the grid
        alpha, sigma = weighted.adapter.schedule.alpha_sigma(torch.tensor(weighted.levels, dtype=torch.float64))
        inverse = alpha / sigma if tiny == "tiny-sd15" else 1.0 / sigma
        assert torch.allclose(weighted.step_weights, inverse / inverse.mean(), rtol=1e-9)
        assert weighted.step_weights[0] < weighted.step_weights[-1]  # the noisiest step weighs least
        # the weighting draws no random numbers: both trainers train the same step on the same sample
        logs = [trainer.method.generator_step() for trainer in trainers]
        assert logs[0]["student_step"] == logs[1]["student_step"]
        steps_seen.add(logs[1]["student_step"])
        weight = float(weighted.step_weights[int(logs[1]["student_step"])])
        assert logs[1]["loss_generator"] == pytest.approx(weight * logs[0]["loss_generator"], rel=1e-5)
        assert logs[1]["grad_norm_student"] == pytest.approx(weight * logs[0]["grad_norm_student"], rel=1e-4)
    assert len(steps_seen) >= 2


def test_regression_loss_pairs_are_the_teachers_cfg_samples_and_its_gradient_is_weight_times_mse(tiny_model_dir,
                                                                                                   tmp_path):
    from decoupled_dmd.trainer.sampling import cfg_sample

    trainer = make_trainer(tiny_model_dir, tmp_path, regression_loss_weight=2.0, regression_pairs=3,
                           regression_teacher_steps=3, train_batch_size=2, guidance_scale=4.0)
    prompts, noise, target = trainer.regression.make_pairs(trainer)
    assert len(prompts) == 3 and set(prompts) <= set(PROMPTS)
    assert noise.shape == target.shape == (3, *trainer.latent_shape)
    # an independent route: the adapter's own denoiser (the student adapter is still zero) and fresh encodings
    adapter = trainer.adapter
    expected = cfg_sample(adapter.denoiser(), noise, adapter.encode_prompts(prompts), adapter.encode_prompts([""] * 3),
                          4.0, 3)
    assert torch.allclose(target, expected.float(), rtol=1e-4, atol=1e-4)  # other batch sizes: float error
    other = make_trainer(tiny_model_dir, tmp_path / "again", regression_loss_weight=2.0, regression_pairs=3,
                         regression_teacher_steps=3, train_batch_size=2, guidance_scale=4.0)
    again = other.regression.make_pairs(other)
    assert again[0] == prompts and torch.equal(again[1], noise) and torch.equal(again[2], target)  # resume rebuilds

    state = trainer.random.generator.get_state()
    loss = trainer.regression.backward(trainer)["loss_regression"]
    grads = {id(p): p.grad.clone() for p in trainer.roles.trainable_parameters("student")}
    trainer.random.generator.set_state(state)
    indices = torch.randint(3, (2,), generator=trainer.random.generator).tolist()
    for p in trainer.roles.trainable_parameters("student"):
        p.grad = None
    x0 = trainer.x0("student", noise[indices], trainer.level(trainer.levels[0], 2),
                     trainer.conditioning([prompts[i] for i in indices]), train=True)
    reference = torch.nn.functional.mse_loss(x0.float(), target[indices])
    (2.0 * reference).backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6) and loss > 0
    for p in trainer.roles.trainable_parameters("student"):
        assert torch.allclose(grads[id(p)], p.grad, atol=1e-7)

    # _optimize adds its loss's gradient to the regression's (accumulate) instead of starting afresh
    parameters = trainer.roles.trainable_parameters("student")
    for p in parameters:
        p.grad = torch.full_like(p, 0.5)
    zero_loss = sum((p * 0).sum() for p in parameters)
    expected_norm = 0.5 * math.sqrt(sum(p.numel() for p in parameters))
    assert trainer.optimize("student", zero_loss, accumulate=True) == pytest.approx(expected_norm, rel=1e-5)
    for p in parameters:
        p.grad = torch.full_like(p, 0.5)
    assert trainer.optimize("student", sum((p * 0).sum() for p in parameters)) == 0.0

    logs = trainer.method.generator_step()
    assert logs["loss_regression"] > 0 and logs["grad_norm_student"] > 0


def test_regression_pairs_are_made_before_the_first_update_with_progress_and_a_stop_there_writes_nothing(
        tiny_model_dir, tmp_path):
    """Minutes on SDXL: the pairs come before the first update's clock and cost, say how far they are (the
    Train node's progress text), and Cancel during them ends the run before anything is written."""

    phases = []
    stop_at = {"sample": 2}
    callbacks = TrainerCallbacks(on_phase=phases.append,
                                 should_stop=lambda: sum("teacher sample" in p for p in phases) >= stop_at["sample"])
    options = dict(regression_loss_weight=1.0, regression_pairs=5, regression_teacher_steps=2, max_train_steps=1)
    trainer = make_trainer(tiny_model_dir, tmp_path, callbacks=callbacks, **options)
    assert trainer.train() is None
    assert [p.split(" (")[0] for p in phases if "teacher sample" in p] == \
        ["regression loss: teacher sample 1 of 5", "regression loss: teacher sample 3 of 5"]  # batch 2
    written = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith((".safetensors", ".jsonl"))]
    assert trainer.regression.pairs is None and trainer.step == 0 and written == []

    phases.clear()
    stop_at["sample"] = 99
    trainer = make_trainer(tiny_model_dir, tmp_path / "full", callbacks=callbacks, **options)
    assert trainer.train() is not None and len(trainer.regression.pairs[0]) == 5
    logs = jsonl(tmp_path / "full" / "out" / "logs" / "metrics.jsonl")[-1]
    assert logs.get("seconds_regression_pairs", 0.0) == 0.0  # not charged to the first update (lazily made: it was)


@pytest.mark.parametrize("overrides, present, absent", [
    (dict(renoise_schedule="coupled-shared"), ["ca_magnitude", "dm_magnitude", "loss_fake"], []),
    (dict(renoise_schedule="decoupled-full", update_normalization="shared"), ["dm_magnitude"], []),
    (dict(renoise_schedule="decoupled-constrained", update_normalization="none"), ["dm_magnitude"], []),
    (dict(regularizer="none"), ["ca_magnitude"], ["dm_magnitude", "loss_fake"]),
    (dict(regularizer="mean_variance"), ["loss_mean_variance_kl"], ["dm_magnitude", "loss_fake"]),
    (dict(cfg_augmentation=False), ["dm_magnitude", "loss_fake"], ["ca_magnitude"]),
    (dict(fake_loss_target="x0", uncond_mode="zeros", gradient_checkpointing=True), ["loss_fake"], []),
    (dict(regression_loss_weight=0.5, regression_pairs=2, regression_teacher_steps=2), ["loss_regression"], []),
])
def test_every_method_variant_trains(tiny_model_dir, tmp_path, overrides, present, absent):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=1, **overrides)
    trainer.train()
    logs = jsonl(tmp_path / "out" / "logs" / "metrics.jsonl")[-1]
    for key in present:
        assert key in logs and logs[key] == logs[key], key
    for key in absent:
        assert key not in logs, key
    assert logs["grad_norm_student"] > 0
    assert ("fake" in trainer.optimizers) == (trainer.config.regularizer == "dm")


def test_regression_only_control_steps_on_the_regression_gradient_alone(tiny_model_dir, tmp_path):
    """The control that says what Decoupled DMD adds to DMD's regression loss: no CA, no DM, no fake model and
    no teacher call in an update; the student moves by exactly one Adam step on weight x the regression MSE."""
    with pytest.raises(ConfigError, match="regression-only control"):
        config_from_dict({"cfg_augmentation": False, "regularizer": "none"})  # nothing would train the student
    trainer = make_trainer(tiny_model_dir, tmp_path, cfg_augmentation=False, regularizer="none",
                           regression_loss_weight=2.0, regression_pairs=3, regression_teacher_steps=2,
                           max_grad_norm=0.0)
    assert trainer.config.regression_only and "fake" not in trainer.optimizers
    trainer.regression.prepare(trainer)
    parameters = trainer.roles.trainable_parameters("student")
    before = [p.detach().clone() for p in parameters]
    state = trainer.random.generator.get_state()
    calls = []
    teacher_x0 = trainer.x0
    trainer.x0 = lambda role, *a, **k: calls.append(role) or teacher_x0(role, *a, **k)
    logs = trainer.train_step()
    trainer.x0 = teacher_x0
    assert calls == ["student"]  # one trained call, no teacher or fake call
    assert logs["loss_generator"] == pytest.approx(2.0 * logs["loss_regression"]) and "gen_std" in logs
    after = [p.detach().clone() for p in parameters]
    # the same step by hand: the regression gradient alone, and Adam's first step, lr * g / (|g| + eps)
    trainer.random.generator.set_state(state)
    for p, value in zip(parameters, before):
        p.data.copy_(value)
        p.grad = None
    trainer.regression.backward(trainer)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    for p, value, moved in zip(parameters, before, after):
        grad = torch.zeros_like(value) if p.grad is None else p.grad
        expected = value - 1e-3 * grad / (grad.abs() + 1e-8)
        assert torch.allclose(moved, expected, atol=1e-6), "the student moved by something besides the regression"
