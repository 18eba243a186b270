"""The accelerate trainer on tiny real models: what moves, what must not, resume, every method variant."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.api import apply_student, read_student_metadata
from decoupled_dmd.trainer.config import ConfigError, config_from_dict
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer, TrainerCallbacks, list_states
from decoupled_dmd.trainer.networks import LoraRoles

PROMPTS = ["a photo of the cat", "a red house", "the dog in the tree", "a blue painting"]


def make_trainer(tiny_model_dir, tmp_path, kind="tiny-sd15", callbacks=None, **overrides):
    values = dict(pretrained_model_name_or_path=kind, output_dir=str(tmp_path / "out"), max_train_steps=2,
                  network_dim=4, network_alpha=4, learning_rate=1e-3, fake_updates_per_step=2, log_with="none",
                  train_batch_size=2, student_timesteps=[999, 749, 499, 249])
    values.update(overrides)
    config = config_from_dict(values)
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir(kind), uncond_mode=config.uncond_mode)
    return DecoupledDMDTrainer(config, adapter, PROMPTS, callbacks=callbacks)


def fixed_inputs(trainer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *trainer.latent_shape, generator=generator)
    level = torch.tensor([0.3, 0.8], dtype=torch.float64)
    return x, level, trainer.conditioning(PROMPTS[:2])


def x0_of(trainer, role):
    with torch.no_grad():
        return trainer.x0(role, *fixed_inputs(trainer))


def jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_lora_mode_trains_student_and_fake_and_leaves_the_teacher(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    assert isinstance(trainer.roles, LoraRoles)
    teacher_before = x0_of(trainer, "teacher")
    torch.testing.assert_close(x0_of(trainer, "student"), teacher_before)  # LoRA B = 0: student starts as teacher
    base_before = {k: v.clone() for k, v in trainer.adapter.network.named_parameters() if "lora_" not in k}

    trainer.train()

    torch.testing.assert_close(x0_of(trainer, "teacher"), teacher_before, rtol=0, atol=0)
    for name, value in trainer.adapter.network.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name]), f"frozen base weight {name} changed"
    assert not torch.allclose(x0_of(trainer, "student"), teacher_before)
    assert not torch.allclose(x0_of(trainer, "fake"), teacher_before)
    trainable = sum(p.numel() for p in trainer.roles.trainable_parameters("student"))
    assert 0 < trainable < 0.2 * sum(p.numel() for p in base_before.values())

    logs = jsonl(tmp_path / "out" / "logs" / "metrics.jsonl")
    assert [entry["step"] for entry in logs] == [1, 2]
    for key in ("loss_generator", "loss_fake", "grad_norm_student", "grad_norm_fake", "gen_mean", "gen_std",
                "ca_magnitude", "dm_magnitude", "tau_ca", "tau_dm"):
        assert all(map(lambda e: e[key] == e[key] and abs(e[key]) < 1e6, logs)), key
    assert os.path.isfile(tmp_path / "out" / "samples" / "step_000002.png")


def test_saved_lora_reproduces_the_trained_student(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    path = trainer.train()
    metadata = read_student_metadata(path)
    assert json.loads(metadata["decoupled_dmd.student_timesteps"]) == [999, 749, 499, 249]
    assert metadata["decoupled_dmd.method"] == "decoupled-dmd"
    assert "renoise_schedule" in metadata["decoupled_dmd.config"]

    fresh = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    assert apply_student(fresh, path) == [999, 749, 499, 249]
    x, level, cond = fixed_inputs(trainer)
    with torch.no_grad():
        reloaded = fresh.predict_x0(fresh.network, x, level, cond)
    torch.testing.assert_close(reloaded, x0_of(trainer, "student"), rtol=1e-5, atol=1e-5)


def test_full_mode_keeps_three_copies(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, training_mode="full", learning_rate=1e-4, max_train_steps=1,
                           save_precision="float")
    teacher_before = x0_of(trainer, "teacher")
    path = trainer.train()
    torch.testing.assert_close(x0_of(trainer, "teacher"), teacher_before, rtol=0, atol=0)
    assert not torch.allclose(x0_of(trainer, "student"), teacher_before)
    fresh = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    apply_student(fresh, path)
    x, level, cond = fixed_inputs(trainer)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_x0(fresh.network, x, level, cond), x0_of(trainer, "student"))


def test_resume_continues_bit_for_bit(tiny_model_dir, tmp_path):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", max_train_steps=4, save_every_n_steps=2)
    straight.train()

    first = make_trainer(tiny_model_dir, tmp_path / "b", max_train_steps=2)
    first.train()
    state = list_states(str(tmp_path / "b" / "out"))[-1]
    assert state.endswith("state-000002")
    resumed = make_trainer(tiny_model_dir, tmp_path / "c", max_train_steps=4, resume=state)
    resumed.train()

    for role in ("student", "fake"):
        expected = straight.roles.trainable_state_dict(role)
        actual = resumed.roles.trainable_state_dict(role)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{role} {key} differs after resume"
    log_a = jsonl(tmp_path / "a" / "out" / "logs" / "metrics.jsonl")
    log_c = jsonl(tmp_path / "c" / "out" / "logs" / "metrics.jsonl")
    drop = lambda entry: {k: v for k, v in entry.items() if not k.startswith("seconds_")}  # noqa: E731  (timings)
    assert [drop(e) for e in log_a[2:]] == [drop(e) for e in log_c]


def test_student_ema_is_what_previews_and_the_file_hold_and_it_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", max_train_steps=4, save_every_n_steps=2,
                            student_ema_decay=0.5)
    path = straight.train()
    raw = x0_of(straight, "student")
    with straight.student_in_use():
        average = x0_of(straight, "student")
    torch.testing.assert_close(x0_of(straight, "student"), raw, rtol=0, atol=0)  # swapped back exactly
    assert not torch.allclose(average, raw)
    fresh = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    apply_student(fresh, path)
    x, level, cond = fixed_inputs(straight)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_x0(fresh.network, x, level, cond), average, rtol=1e-4, atol=1e-4)
    logs = jsonl(tmp_path / "a" / "out" / "logs" / "metrics.jsonl")
    # 0.5 (1 - 0.5^n) / (1 - 0.5^(n+1))
    assert [e["ema_decay"] for e in logs] == pytest.approx([0.0, 1 / 3, 3 / 7, 7 / 15])

    first = make_trainer(tiny_model_dir, tmp_path / "b", max_train_steps=2, student_ema_decay=0.5)
    first.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "c", max_train_steps=4, student_ema_decay=0.5,
                           resume=list_states(str(tmp_path / "b" / "out"))[-1])
    resumed.train()
    for key, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[key]), f"EMA {key} differs after resume"


def test_adafactor_trains_with_little_optimizer_state_and_resumes(tiny_model_dir, tmp_path):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", max_train_steps=3, optimizer_type="adafactor")
    before = {k: v.clone() for k, v in straight.roles.trainable_state_dict("student").items()}
    straight.train()
    after = straight.roles.trainable_state_dict("student")
    assert any(not torch.equal(before[k], after[k]) for k in before), "adafactor did not move the student"
    for role in ("student", "fake"):
        optimizer = straight.optimizers[role].optimizer
        assert type(optimizer).__name__ == "Adafactor"
        params = sum(p.numel() for p in straight.roles.trainable_parameters(role))
        state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        # AdamW holds 2 x params; Adafactor factors each tensor's last two dims (3x3 conv LoRAs keep 2/3)
        assert 0 < state < 0.75 * params

    first = make_trainer(tiny_model_dir, tmp_path / "b", max_train_steps=2, optimizer_type="adafactor")
    first.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "c", max_train_steps=3, optimizer_type="adafactor",
                           resume=list_states(str(tmp_path / "b" / "out"))[-1])
    resumed.train()
    for key, value in straight.roles.trainable_state_dict("student").items():
        assert torch.equal(value, resumed.roles.trainable_state_dict("student")[key]), key


def test_stop_request_saves_a_resumable_state(tiny_model_dir, tmp_path):
    calls = []
    callbacks = TrainerCallbacks(should_stop=lambda: len(calls) >= 1, on_step=lambda step, logs: calls.append(step))
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=50, callbacks=callbacks)
    path = trainer.train()
    assert calls == [1]
    assert [os.path.basename(p) for p in list_states(str(tmp_path / "out"))] == ["state-000001"]
    assert read_student_metadata(path)["decoupled_dmd.train_steps"] == "1"
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")], "a partial file was left behind"


def test_hybrid_ca_levels_are_cleaner_than_the_student_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, train_batch_size=1)
    for _ in range(12):
        logs = trainer.method.generator_step()
        student_level = trainer.levels[int(logs["student_step"])]
        assert logs["tau_ca"] > student_level
        assert trainer.level_bounds[0] < logs["tau_dm"] <= trainer.level_bounds[1]


@pytest.mark.parametrize("kind", ["tiny-sd15", "tiny-flow"])
def test_prediction_step_weighting_scales_each_steps_loss_and_gradient(tiny_model_dir, tmp_path, kind):
    timesteps = [1000, 750, 500, 250] if kind == "tiny-flow" else [999, 749, 499, 249]
    steps_seen = set()
    for seed in (0, 1, 2):  # one update per pair of fresh trainers: after it their weights (and Adam) differ
        trainers = [make_trainer(tiny_model_dir, tmp_path / f"{mode}{seed}", kind=kind, max_grad_norm=0.0, seed=seed,
                                 train_batch_size=1, student_timesteps=timesteps, generator_step_weighting=mode)
                    for mode in ("x0", "prediction")]
        plain, weighted = trainers
        assert torch.equal(plain.step_weights, torch.ones(4, dtype=torch.float64))
        # hand values: d x0 / d prediction is sigma / alpha for eps and sigma for flow; the weights are its
        # inverse, divided by their mean over the grid
        alpha, sigma = weighted.adapter.schedule.alpha_sigma(torch.tensor(weighted.levels, dtype=torch.float64))
        inverse = alpha / sigma if kind == "tiny-sd15" else 1.0 / sigma
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


def test_lr_scheduler_decays_the_student_and_keeps_the_fake_constant(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=4, lr_scheduler="linear", learning_rate=1e-3,
                           fake_learning_rate=2e-3, fake_updates_per_step=1, train_batch_size=1)
    rates = []
    for _ in range(4):
        rates.append({role: optimizer.param_groups[0]["lr"] for role, optimizer in trainer.optimizers.items()})
        trainer.train_step()
    assert [rate["student"] for rate in rates] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [rate["fake"] for rate in rates] == pytest.approx([2e-3] * 4)


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
    from decoupled_dmd.trainer.loop import TrainerCallbacks

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


@pytest.mark.parametrize("kind", ["tiny-sdxl", "tiny-sd15-v", "tiny-flow"])
def test_other_families_train(tiny_model_dir, tmp_path, kind):
    timesteps = [1000, 500] if kind == "tiny-flow" else [999, 499]
    trainer = make_trainer(tiny_model_dir, tmp_path, kind=kind, max_train_steps=1, student_timesteps=timesteps)
    path = trainer.train()
    assert load_file(path)
    logs = jsonl(tmp_path / "out" / "logs" / "metrics.jsonl")[-1]
    assert logs["grad_norm_student"] > 0 and logs["loss_fake"] > 0


def test_bf16_autocast_on_cpu(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=1, mixed_precision="bf16")
    assert next(p for n, p in trainer.adapter.network.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.roles.trainable_parameters("student"))
    trainer.train()
    logs = jsonl(tmp_path / "out" / "logs" / "metrics.jsonl")[-1]
    assert logs["grad_norm_student"] == logs["grad_norm_student"] and logs["grad_norm_student"] > 0


def test_every_adapter_answers_whether_it_can_write_a_merged_checkpoint(tiny_model_dir, tmp_path):
    from decoupled_dmd.trainer.adapters.comfy import ComfyAdapter
    from decoupled_dmd.trainer.config import ConfigError

    # ComfyUI writes its all-in-one checkpoint with its own saver: refused before training, not after
    comfy_like = object.__new__(ComfyAdapter)
    assert "ComfyUI's own saver" in ComfyAdapter.merged_checkpoint_problem(comfy_like)
    flow = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-flow"))
    assert "not a 'flow' model" in flow.merged_checkpoint_problem()
    assert DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl")).merged_checkpoint_problem() is None
    with pytest.raises(ConfigError, match="save_merged_checkpoint"):
        make_trainer(tiny_model_dir, tmp_path, kind="tiny-flow", save_merged_checkpoint=True)
    identity = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15")).identity()
    assert len(identity["sha256"]) == 64 and os.sep not in identity["model"]


def test_a_flow_teacher_trains_with_a_timestep_shift(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, kind="tiny-flow", timestep_shift=3.0,
                           student_timesteps=[999, 900, 750, 500], max_train_steps=1)
    logs = trainer.train_step()
    assert all(math.isfinite(logs[k]) for k in ("loss_generator", "tau_ca", "tau_dm"))
    assert 0.0 < logs["tau_dm"] <= 0.98 + 1e-9


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
