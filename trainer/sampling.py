"""Samplers on the denoiser contract: the student's few-step sampler and the teacher's CFG sampler."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .denoiser import Conditioning, Denoiser, batched_x0
from .losses import classifier_free_guidance
from .schedules import NoiseSchedule, append_dims, teacher_sampling_levels


def student_levels(schedule: NoiseSchedule, timesteps: list) -> list[float]:
    return [float(schedule.level(t)) for t in timesteps]


def few_step_sample(student: Denoiser, noise: Tensor, levels: list[float], cond: Conditioning,
                    generator: torch.Generator | None = None, stop_after: int | None = None,
                    callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """The DMD2/LCM multistep sampler: predict x0, re-noise it with fresh noise to the next level, cfg 1.

    Starts from pure noise at levels[0]. With `stop_after = k` it returns the input of step k instead
    (backward simulation: the generator input z_t for a student step t_k). `callback(index, x0)` sees each
    step's x0 prediction (as k-diffusion's samplers report theirs).
    """
    x = noise
    steps = len(levels) if stop_after is None else stop_after
    for index in range(steps):
        level = torch.full((x.shape[0],), levels[index], dtype=torch.float64, device=x.device)
        x0 = student(x, level, cond)
        if callback is not None:
            callback(index, x0)
        if stop_after is None and index == len(levels) - 1:
            return x0
        next_level = torch.full_like(level, levels[index + 1])
        fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = student.schedule.renoise(x0.to(x.dtype), fresh, next_level)
    return x


@torch.no_grad()
def cfg_sample(teacher: Denoiser, noise: Tensor, cond: Conditioning, uncond: Conditioning,
               guidance_scale: float, steps: int) -> Tensor:
    """Deterministic DDIM in x0 space with classifier-free guidance (Euler for flow models)."""
    schedule = teacher.schedule
    levels = teacher_sampling_levels(schedule, steps)
    x = noise
    for index in range(steps):
        level = torch.full((x.shape[0],), levels[index], dtype=torch.float64, device=x.device)
        x0_cond, x0_uncond = batched_x0(teacher, [(x, level, cond), (x, level, uncond)])
        x0 = classifier_free_guidance(x0_cond, x0_uncond, guidance_scale)
        if levels[index + 1] >= 1.0:
            return x0
        alpha, sigma = schedule.alpha_sigma(level)
        eps = (x.float() - append_dims(alpha.float(), x.ndim) * x0) / append_dims(sigma.float(), x.ndim)
        x = schedule.renoise(x0, eps, torch.full_like(level, levels[index + 1])).to(noise.dtype)
    return x
