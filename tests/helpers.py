"""Helpers shared by the trainer's tests: a tiny trainer, fixed inputs, the metrics log."""

import json

import torch

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.config import config_from_dict
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer

PROMPTS = ["a photo of the cat", "a red house", "the dog in the tree", "a blue painting"]


def make_trainer(tiny_model_dir, tmp_path, tiny="tiny-sd15", callbacks=None, **overrides):
    values = dict(pretrained_model_name_or_path=tiny, output_dir=str(tmp_path / "out"), max_train_steps=2,
                  network_dim=4, network_alpha=4, learning_rate=1e-3, fake_updates_per_step=2, log_with="none",
                  train_batch_size=2, student_timesteps=[999, 749, 499, 249])
    values.update(overrides)
    config = config_from_dict(values)
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir(tiny), uncond_mode=config.uncond_mode)
    return DecoupledDMDTrainer(config, adapter, PROMPTS, callbacks=callbacks)


def fixed_inputs(trainer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *trainer.latent_shape, generator=generator)
    level = torch.tensor([0.3, 0.8], dtype=torch.float64)
    return x, level, trainer.conditioning(PROMPTS[:2])


def jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
