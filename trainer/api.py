"""High-level entry points shared by the CLI and other front ends: load a teacher, distil, sample."""

from __future__ import annotations

import json
import logging
import os

import torch

from .config import ConfigError, TrainConfig
from .denoiser import ModelAdapter
from .loop import DecoupledDMDTrainer, TrainerCallbacks

logger = logging.getLogger(__name__)


def read_prompts(source, what: str = "prompt_file") -> list[str]:
    """Prompts from a text file (one per line; blank lines and # comments skipped) or a list."""
    if isinstance(source, list):
        return [str(p) for p in source if str(p).strip()]
    if not source:
        return []
    if not os.path.isfile(source):
        raise ConfigError(f"{what}: {source!r} does not exist; give a text file with one prompt per line")
    with open(source, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{what}: {source!r} holds no prompts; write one prompt per line")
    return prompts


def load_teacher(name_or_path: str, uncond_mode: str = "empty_prompt") -> ModelAdapter:
    """A diffusers folder / hub id, or builtin:<tiny model>, as a `ModelAdapter`."""
    from .adapters.diffusers import DiffusersAdapter
    from .tiny_models import resolve_builtin

    if not name_or_path:
        raise ConfigError("pretrained_model_name_or_path: empty; give a diffusers model folder or builtin:tiny-sd15")
    path = resolve_builtin(name_or_path)
    if os.path.isfile(path):
        raise ConfigError(f"pretrained_model_name_or_path: {path!r} is a file; single-file checkpoints are not "
                          "supported yet, give a diffusers model folder")
    return DiffusersAdapter.from_pretrained(path, uncond_mode=uncond_mode)


def distill(config: TrainConfig, callbacks: TrainerCallbacks | None = None,
            adapter: ModelAdapter | None = None) -> str:
    """Run Decoupled DMD as configured; returns the path of the saved student."""
    prompts = read_prompts(config.prompt_file)
    if not prompts:
        raise ConfigError("prompt_file: not set; give a text file with one training prompt per line")
    sample_prompts = read_prompts(config.sample_prompts, "sample_prompts") or None
    adapter = adapter or load_teacher(config.pretrained_model_name_or_path, config.uncond_mode)
    trainer = DecoupledDMDTrainer(config, adapter, prompts, sample_prompts, callbacks=callbacks)
    return trainer.train()


def read_student_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("decoupled_dmd.method") != "decoupled-dmd":
        raise ValueError(f"{path!r} is not a Decoupled DMD student (no decoupled_dmd metadata)")
    return metadata


def apply_student(adapter: ModelAdapter, student_path: str) -> list[int]:
    """Load a saved student into the adapter's backbone in place; returns its trained timesteps."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    metadata = read_student_metadata(student_path)
    tensors = load_file(student_path)
    network = adapter.network
    if metadata["decoupled_dmd.training_mode"] == "lora":
        config = LoraConfig(r=int(metadata["decoupled_dmd.network_dim"]),
                            lora_alpha=float(metadata["decoupled_dmd.network_alpha"]),
                            target_modules=json.loads(metadata["decoupled_dmd.lora_target_modules"]))
        inject_adapter_in_model(config, network, adapter_name="student")
        renamed = {}
        for key, value in tensors.items():
            name = key.removeprefix("unet.")
            for part in ("lora_A", "lora_B"):
                name = name.replace(f".{part}.weight", f".{part}.student.weight")
            renamed[name] = value
        missing = [k for k in renamed if k not in dict(network.named_parameters())]
        if missing:
            raise ValueError(f"{student_path!r} does not fit this model: unknown keys such as {missing[:2]}")
        network.load_state_dict(renamed, strict=False)
    else:
        network.load_state_dict(tensors)
    return json.loads(metadata["decoupled_dmd.student_timesteps"])


@torch.no_grad()
def sample_images(adapter: ModelAdapter, prompts: list[str], seed: int, timesteps: list[int] | None = None,
                  teacher_steps: int | None = None, guidance_scale: float | None = None,
                  resolution: tuple[int, int] | None = None, device: str | None = None) -> torch.Tensor:
    """Few-step student samples (timesteps given) or teacher CFG samples (teacher_steps given), in [0, 1]."""
    from .sampling import cfg_sample, few_step_sample, student_levels

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter.place(device, torch.float32)
    height, width = resolution or adapter.default_resolution
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *adapter.latent_shape(height, width)), generator=generator).to(device)
    cond = adapter.encode_prompts(prompts).to(device)
    denoiser = adapter.denoiser()
    if teacher_steps:
        uncond = adapter.encode_prompts([""] * len(prompts)).to(device)
        latents = cfg_sample(denoiser, noise, cond, uncond, guidance_scale or adapter.default_guidance_scale,
                             teacher_steps)
    else:
        levels = student_levels(adapter.schedule, timesteps)
        latents = few_step_sample(denoiser, noise, levels, cond, generator=generator)
    return adapter.decode(latents)
