"""Run under `accelerate launch --num_processes 2 --cpu`: train a tiny teacher, dump each rank's adapters."""

import json
import sys

import torch
from safetensors.torch import save_file

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.config import config_from_dict
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer


def main(model_dir: str, output_dir: str) -> None:
    config = config_from_dict(dict(pretrained_model_name_or_path=model_dir, output_dir=output_dir,
                                   max_train_steps=3, network_dim=4, network_alpha=4, learning_rate=1e-3,
                                   fake_updates_per_step=2, log_with="none", student_timesteps=[999, 499]))
    adapter = DiffusersAdapter.from_pretrained(model_dir)
    trainer = DecoupledDMDTrainer(config, adapter, ["a photo of the cat", "a red house", "the dog", "a blue tree"])
    losses = []
    trainer.callbacks.on_step = lambda step, logs: losses.append(logs["loss_generator"])
    trainer.train()
    rank = trainer.accelerator.process_index
    tensors = {f"{role}/{k}": v.contiguous() for role in ("student", "fake")
               for k, v in trainer.roles.trainable_state_dict(role).items()}
    save_file(tensors, f"{output_dir}/rank{rank}.safetensors")
    with open(f"{output_dir}/rank{rank}.json", "w") as handle:
        json.dump({"losses": losses, "num_processes": trainer.accelerator.num_processes,
                   "finite": all(torch.isfinite(v).all().item() for v in tensors.values())}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
