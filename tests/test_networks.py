"""Gradient checkpointing with LoRA roles: backward must recompute with the adapter whose loss it is."""

import torch

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.config import config_from_dict
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer


def _student_after_one_update(tiny_model_dir, tmp_path, checkpointing):
    config = config_from_dict(dict(output_dir=str(tmp_path / f"gc{checkpointing}"), max_train_steps=1, network_dim=4,
                                   network_alpha=4, learning_rate=1e-2, fake_updates_per_step=1, log_with="none",
                                   gradient_checkpointing=checkpointing, student_timesteps=[999, 499]))
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    trainer = DecoupledDMDTrainer(config, adapter, ["a photo of the cat", "a red house"])
    trainer.train_step()
    return {k: v.clone() for k, v in trainer.roles.trainable_state_dict("student").items()}


def test_checkpointed_student_update_equals_the_plain_one(tiny_model_dir, tmp_path):
    plain = _student_after_one_update(tiny_model_dir, tmp_path, False)
    checkpointed = _student_after_one_update(tiny_model_dir, tmp_path, True)
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-4, atol=1e-6, msg=name)
