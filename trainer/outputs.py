"""Files the trainer writes: atomic safetensors with metadata, preview grids."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import time
from typing import Callable

import torch
from torch import Tensor

METHOD = "decoupled-dmd"


def free_path(path: str) -> str:
    """`path` if nothing is there, else the first `<stem>_00001_<ext>` that is free (ComfyUI's counter)."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    for counter in range(1, 100000):
        candidate = f"{stem}_{counter:05d}_{ext}"
        if not os.path.exists(candidate):
            return candidate
    raise FileExistsError(f"{path!r}: no free counter name left; clean up the folder")


def atomic_write(path: str, write: Callable[[str], object], overwrite: bool = False) -> str:
    """Call `write(staging)` on a temporary file in the target folder, then move it to `path`.

    A failed or interrupted write (a full disk, Ctrl-C) leaves no file under the final name and removes the
    temporary one. An existing file is replaced only if `overwrite`; otherwise a counter is added to the name,
    claimed with a hard link so that two writers never take the same name. Returns the path written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        try:
            write(staging)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(error.errno, f"disk full while writing {path!r}; nothing was written under that name: "
                                           "free space or choose another folder") from error
            raise
        if overwrite:
            os.replace(staging, path)
            return path
        while True:
            target = free_path(path)
            try:
                os.link(staging, target)  # fails if the name was taken meanwhile: never clobbers
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: a plain rename after the check
                os.replace(staging, target)
                return target
            os.remove(staging)
            return target
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None,
                            overwrite: bool = True) -> str:
    """Save tensors with `atomic_write`; returns the path written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda staging: save_file(tensors, staging, metadata=metadata), overwrite=overwrite)


def student_metadata(config, step: int, adapter, guidance_scale: float, kind: str = "lora",
                     base: dict[str, str] | None = None) -> dict[str, str]:
    """Header of every student file (safetensors metadata is str -> str).

    kind: lora | unet | checkpoint. Holds what a loader needs to sample the student as trained (steps, exact
    timesteps, the stock ComfyUI sampler settings), where it came from (base file and hash) and the full config.
    """
    from .checkpoint import KOHYA_BASE_VERSION, MODELSPEC_ARCHITECTURE, comfyui_sampler_settings

    steps = len(config.student_timesteps)
    family = adapter.family
    architecture = MODELSPEC_ARCHITECTURE.get(family, f"decoupled-dmd-{family}")
    height, width = config.resolution_hw() or adapter.default_resolution
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + ("/lora" if kind == "lora" else ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{config.output_name} ({steps}-step Decoupled DMD)",
        "modelspec.description": f"{steps}-step student distilled with Decoupled DMD; sample at cfg 1 with the "
                                 f"timesteps in decoupled_dmd.student_timesteps (ComfyUI: lcm + sgm_uniform)",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "rectified-flow"}.get(adapter.prediction_type,
                                                                                         adapter.prediction_type),
        "decoupled_dmd.method": METHOD,
        "decoupled_dmd.format": kind,
        "decoupled_dmd.family": family,
        "decoupled_dmd.prediction_type": adapter.prediction_type,
        "decoupled_dmd.training_mode": config.training_mode,
        "decoupled_dmd.steps": str(steps),
        "decoupled_dmd.student_timesteps": json.dumps([int(t) for t in config.student_timesteps]),
        "decoupled_dmd.comfyui_sampler": json.dumps(comfyui_sampler_settings(steps)),
        "decoupled_dmd.train_steps": str(step),
        "decoupled_dmd.guidance_scale": str(guidance_scale),
        "decoupled_dmd.renoise_schedule": config.renoise_schedule,
        "decoupled_dmd.network_dim": str(config.network_dim),
        "decoupled_dmd.network_alpha": str(config.network_alpha),
        "decoupled_dmd.lora_target_modules": json.dumps(
            config.lora_target_modules or adapter.default_lora_target_modules()),
        "decoupled_dmd.config": config.to_toml(),
    }
    for name, value in (base or {}).items():
        metadata[f"decoupled_dmd.base_{name}"] = value
    if kind == "lora":  # read by kohya tools and A1111/Forge's LoRA info panel
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(config.network_dim),
                         "ss_network_alpha": str(config.network_alpha),
                         "ss_base_model_version": KOHYA_BASE_VERSION.get(family, family),
                         "ss_v2": "False", "ss_output_name": config.output_name})
    return metadata


def save_image_grid(images: Tensor, path: str, columns: int | None = None) -> str:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid, atomically."""
    from PIL import Image

    count = images.shape[0]
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    height, width = images.shape[-2:]
    grid = torch.zeros(3, rows * height, columns * width)
    for index, image in enumerate(images.float().cpu()):
        row, column = divmod(index, columns)
        grid[:, row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return atomic_write(path, lambda staging: Image.fromarray(array).save(staging, format="PNG"), overwrite=True)
