"""The accelerate trainer on tiny real models: what moves, what must not, resume, every method variant."""

import json
import math
import os

import pytest
import torch
from helpers import fixed_inputs, jsonl, make_trainer
from safetensors.torch import load_file

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.api import apply_student, read_student_metadata
from decoupled_dmd.trainer.config import ConfigError
from decoupled_dmd.trainer.loop import TrainerCallbacks, list_states
from decoupled_dmd.trainer.networks import LoraRoles


def x0_of(trainer, role):
    with torch.no_grad():
        return trainer.x0(role, *fixed_inputs(trainer))


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


def test_lr_scheduler_decays_the_student_and_keeps_the_fake_constant(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=4, lr_scheduler="linear", learning_rate=1e-3,
                           fake_learning_rate=2e-3, fake_updates_per_step=1, train_batch_size=1)
    rates = []
    for _ in range(4):
        rates.append({role: optimizer.param_groups[0]["lr"] for role, optimizer in trainer.optimizers.items()})
        trainer.train_step()
    assert [rate["student"] for rate in rates] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [rate["fake"] for rate in rates] == pytest.approx([2e-3] * 4)


@pytest.mark.parametrize("tiny", ["tiny-sdxl", "tiny-sd15-v", "tiny-flow"])
def test_other_families_train(tiny_model_dir, tmp_path, tiny):
    timesteps = [1000, 500] if tiny == "tiny-flow" else [999, 499]
    trainer = make_trainer(tiny_model_dir, tmp_path, tiny=tiny, max_train_steps=1, student_timesteps=timesteps)
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

    # ComfyUI writes its all-in-one checkpoint with its own saver: refused before training, not after
    comfy_like = object.__new__(ComfyAdapter)
    assert "ComfyUI's own saver" in ComfyAdapter.merged_checkpoint_problem(comfy_like)
    flow = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-flow"))
    assert "not a 'flow' model" in flow.merged_checkpoint_problem()
    assert DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl")).merged_checkpoint_problem() is None
    with pytest.raises(ConfigError, match="save_merged_checkpoint"):
        make_trainer(tiny_model_dir, tmp_path, tiny="tiny-flow", save_merged_checkpoint=True)
    identity = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15")).identity()
    assert len(identity["sha256"]) == 64 and os.sep not in identity["model"]


def test_a_flow_teacher_trains_with_a_timestep_shift(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, tiny="tiny-flow", timestep_shift=3.0,
                           student_timesteps=[999, 900, 750, 500], max_train_steps=1)
    logs = trainer.train_step()
    assert all(math.isfinite(logs[k]) for k in ("loss_generator", "tau_ca", "tau_dm"))
    assert 0.0 < logs["tau_dm"] <= 0.98 + 1e-9


