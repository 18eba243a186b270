"""The metadata schema of every student file (LoRA, UNet, all-in-one checkpoint): `modelspec.*`,
`decoupled_dmd.*` and kohya's `ss_*`, written and read here.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import ConfigError
from .safetensors_io import file_sha256, read_safetensors_header

MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def comfyui_sampler_settings(steps: int) -> dict:
    """What a stock KSampler needs to sample the student (the Few-Step Sampler reads the exact timesteps)."""
    return {"sampler_name": "lcm", "scheduler": "sgm_uniform", "cfg": 1.0, "steps": steps}


METHOD = "decoupled-dmd"


def student_metadata(config, step: int, *, guidance_scale: float, family: str, prediction_type: str,
                     resolution: tuple[int, int], lora_target_modules: list[str], file_format: str = "lora",
                     base: dict[str, str] | None = None) -> dict[str, str]:
    """Header of every student file (safetensors metadata is str -> str).

    file_format: lora | unet | checkpoint. family, prediction_type: the teacher's; resolution: the run's (height,
    width) in pixels; lora_target_modules: the modules the run adapts (as peft matches them); base: the base
    model's identity (name, sha256), written as `decoupled_dmd.base_<name>`. Holds what a loader needs to sample
    the student as trained (steps, exact timesteps, the stock ComfyUI sampler settings), where it came from (base
    file and hash) and the full config.
    """
    steps = len(config.student_timesteps)
    architecture = MODELSPEC_ARCHITECTURE.get(family, f"decoupled-dmd-{family}")
    height, width = resolution
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + ("/lora" if file_format == "lora" else ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{config.output_name} ({steps}-step Decoupled DMD)",
        "modelspec.description": f"{steps}-step student distilled with Decoupled DMD; sample at cfg 1 with the "
                                 f"timesteps in decoupled_dmd.student_timesteps (ComfyUI: lcm + sgm_uniform)",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "rectified-flow"}.get(prediction_type,
                                                                                         prediction_type),
        "decoupled_dmd.method": METHOD,
        "decoupled_dmd.format": file_format,
        "decoupled_dmd.family": family,
        "decoupled_dmd.prediction_type": prediction_type,
        "decoupled_dmd.training_mode": config.training_mode,
        "decoupled_dmd.steps": str(steps),
        "decoupled_dmd.student_timesteps": json.dumps([int(t) for t in config.student_timesteps]),
        "decoupled_dmd.comfyui_sampler": json.dumps(comfyui_sampler_settings(steps)),
        "decoupled_dmd.train_steps": str(step),
        "decoupled_dmd.guidance_scale": str(guidance_scale),
        "decoupled_dmd.renoise_schedule": config.renoise_schedule,
        "decoupled_dmd.network_dim": str(config.network_dim),
        "decoupled_dmd.network_alpha": str(config.network_alpha),
        "decoupled_dmd.lora_target_modules": json.dumps(lora_target_modules),
        "decoupled_dmd.config": shareable_config(config).to_toml(),
    }
    for name, value in (base or {}).items():
        metadata[f"decoupled_dmd.base_{name}"] = value
    if config.network_weights:  # the warm start: which LoRA the student began as
        metadata["decoupled_dmd.network_weights"] = os.path.basename(config.network_weights)
        metadata["decoupled_dmd.network_weights_sha256"] = file_sha256(config.network_weights)
    if file_format == "lora":  # read by kohya tools and A1111/Forge's LoRA info panel
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(config.network_dim),
                         "ss_network_alpha": str(config.network_alpha),
                         "ss_base_model_version": KOHYA_BASE_VERSION.get(family, family),
                         "ss_v2": "False", "ss_output_name": config.output_name})
    return metadata


PATH_KEYS = ("pretrained_model_name_or_path", "tokenizer_path", "output_dir", "logging_dir", "prompt_file", "resume",
             "sample_prompts", "network_weights")


def shareable_config(config):
    """The config with local paths cut to their last component: a creator who shares a student shares no folder
    names (a Hugging Face id or builtin: name stays as it is)."""
    changes = {}
    for key in PATH_KEYS:
        value = getattr(config, key)
        if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)
                                                 or value.startswith((".", "~")) or "\\" in value):
            changes[key] = os.path.basename(os.path.normpath(value))
    return config.replace(**changes) if changes else config


def checkpoint_metadata(lora_metadata: dict[str, str]) -> dict[str, str]:
    """A LoRA's header, restated for an all-in-one checkpoint that holds it merged."""
    metadata = {k: v for k, v in lora_metadata.items() if not k.startswith("ss_")}
    metadata["decoupled_dmd.format"] = "checkpoint"
    if metadata.get("modelspec.architecture", "").endswith("/lora"):
        metadata["modelspec.architecture"] = metadata["modelspec.architecture"][: -len("/lora")]
    return metadata


def read_student_metadata(path: str) -> dict[str, str]:
    """The header of a student file (LoRA, UNet or all-in-one checkpoint); refuses files without one."""
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("decoupled_dmd.method") != METHOD:
        raise ConfigError(f"{path!r} is not a Decoupled DMD student (no decoupled_dmd metadata)")
    return metadata


def student_format(metadata: dict[str, str]) -> str:
    """lora | unet | checkpoint (files from before `decoupled_dmd.format` existed: from the training mode)."""
    file_format = metadata.get("decoupled_dmd.format") or \
        ("lora" if metadata.get("decoupled_dmd.training_mode", "lora") == "lora" else "unet")
    if file_format not in ("lora", "unet", "checkpoint"):
        raise ConfigError(f"decoupled_dmd.format {file_format!r} is not lora, unet or checkpoint; the metadata is "
                          "damaged")
    return file_format


def student_timesteps(metadata: dict[str, str]) -> list[int]:
    """The timesteps the student was trained on (sample with exactly these); ConfigError if missing or garbled."""
    from ..schedules import parse_student_timesteps

    key = "decoupled_dmd.student_timesteps"
    try:
        return parse_student_timesteps(json.loads(metadata[key]), key)
    except KeyError:
        raise ConfigError(f"the file's metadata has no {key}; give the timesteps yourself") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the file's {key} is unusable ({error}); give the timesteps yourself") from None
