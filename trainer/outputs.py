"""Files the trainer writes: atomic safetensors with metadata, preview grids."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch
from torch import Tensor

METHOD = "decoupled-dmd"


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None) -> str:
    """Write to a temporary file in the target folder, then rename: no half file under the final name."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".partial-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging, metadata=metadata)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return path


def student_metadata(config, step: int, adapter, guidance_scale: float) -> dict[str, str]:
    """What a loader needs to sample the student as trained (safetensors metadata is str -> str)."""
    return {
        "decoupled_dmd.method": METHOD,
        "decoupled_dmd.family": adapter.family,
        "decoupled_dmd.prediction_type": adapter.prediction_type,
        "decoupled_dmd.training_mode": config.training_mode,
        "decoupled_dmd.steps": str(len(config.student_timesteps)),
        "decoupled_dmd.student_timesteps": json.dumps([int(t) for t in config.student_timesteps]),
        "decoupled_dmd.train_steps": str(step),
        "decoupled_dmd.guidance_scale": str(guidance_scale),
        "decoupled_dmd.network_dim": str(config.network_dim),
        "decoupled_dmd.network_alpha": str(config.network_alpha),
        "decoupled_dmd.lora_target_modules": json.dumps(
            config.lora_target_modules or adapter.default_lora_target_modules()),
        "decoupled_dmd.config": config.to_toml(),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=folder)
    os.close(handle)
    Image.fromarray(array).save(staging, format="PNG")
    os.replace(staging, path)
    return path
