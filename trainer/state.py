"""Resumable training states: one folder per saved step, written atomically, read back bit for bit.

A state holds what accelerate saves (optimisers, schedulers), the trained weights only (the frozen base is
never written), each process's random stream and trainer_state.json (step, counters, output names, config).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

logger = logging.getLogger(__name__)

STATE_PREFIX = "state-"


def save_state(trainer) -> str:
    """Atomically write a resumable state folder state-<step> (old ones beyond keep_last_n_states go)."""
    accelerator, output_dir = trainer.accelerator, trainer.config.output_dir
    final = os.path.join(output_dir, f"{STATE_PREFIX}{trainer.step:06d}")
    staging = os.path.join(output_dir, f".{STATE_PREFIX}{trainer.step:06d}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    from safetensors.torch import save_file

    save_file({"generator": trainer.random.generator.get_state()},
              os.path.join(staging, f"trainer_random_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(staging, "trainer_state.json"), "w", encoding="utf-8") as handle:
            json.dump({"step": trainer.step, "nonfinite_skips": trainer.nonfinite_skips, "output_paths": trainer.output_paths,
                       "num_processes": accelerator.num_processes, "config": trainer.config.to_toml()}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_states(output_dir)[:-trainer.config.keep_last_n_states]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(trainer, where: str) -> None:
    """Load a state written by `save_state`; 'latest' picks the newest in output_dir."""
    from safetensors.torch import load_file

    state_dir = where
    if where == "latest":
        states = list_states(trainer.config.output_dir)
        if not states:
            logger.info("resume = latest: no state in %s, starting fresh", trainer.config.output_dir)
            return
        state_dir = states[-1]
    marker = os.path.join(state_dir, "trainer_state.json")
    if not os.path.isfile(marker):
        raise FileNotFoundError(f"resume: {state_dir!r} is not a training state folder (no trainer_state.json)")
    with open(marker, encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved["num_processes"] != trainer.accelerator.num_processes:
        raise ValueError(f"resume: the state was written by {saved['num_processes']} processes; "
                         f"resume it with the same number (now {trainer.accelerator.num_processes})")
    trainer.accelerator.load_state(state_dir)
    random_file = os.path.join(state_dir, f"trainer_random_{trainer.accelerator.process_index}.safetensors")
    trainer.random.generator.set_state(load_file(random_file)["generator"])
    trainer.step, trainer.nonfinite_skips = saved["step"], saved["nonfinite_skips"]
    if saved.get("output_paths"):
        trainer.output_paths = saved["output_paths"]  # keep writing the files this run started
    logger.info("resumed from %s at step %d", state_dir, trainer.step)


def save_weights_hook(trainer, models, weights, output_dir):
    # accelerate would write the whole (possibly multi-GB, frozen) UNet: save only what is trained.
    from safetensors.torch import save_file

    weights.clear()
    if trainer.accelerator.is_main_process:
        for role in trainer.optimizers:
            tensors = {k: v.contiguous() for k, v in trainer.roles.trainable_state_dict(role).items()}
            save_file(tensors, os.path.join(output_dir, f"{role}_weights.safetensors"))


def load_weights_hook(trainer, models, input_dir):
    from safetensors.torch import load_file

    models.clear()
    for role in trainer.optimizers:
        trainer.roles.load_trainable_state_dict(role, load_file(os.path.join(input_dir, f"{role}_weights.safetensors")))


def list_states(output_dir: str) -> list[str]:
    """Complete state folders in `output_dir`, oldest first."""
    return sorted(p for p in glob.glob(os.path.join(output_dir, f"{STATE_PREFIX}*"))
                  if os.path.isfile(os.path.join(p, "trainer_state.json")))
