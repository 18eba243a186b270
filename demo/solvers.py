"""The teacher with the samplers creators use: diffusers' DDIM, Euler, DPM-Solver++(2M) and UniPC schedulers
with classifier-free guidance, on the denoiser contract (two network calls a step).

The schedulers are diffusers' own (a maintained library, not hand-written solvers); each is built from the
teacher's scheduler config with `timestep_spacing = "trailing"`, so every step count starts from the
noisiest timestep (diffusers' advice for few steps; ComfyUI's "simple" and "sgm_uniform" do the same).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..trainer.denoiser import Conditioning, Denoiser, batched_x0
from ..trainer.losses import classifier_free_guidance
from ..trainer.schedules import append_dims

SOLVERS = {  # name: (diffusers scheduler class, extra config)
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),  # SD's own DDIM config
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(solver: str, scheduler_config: dict):
    """A fresh diffusers scheduler `solver` (one of SOLVERS) from a teacher's scheduler config."""
    import diffusers

    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    name, extra = SOLVERS[solver]
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", steps_offset=0, **extra)
    return getattr(diffusers, name).from_config(config)


@torch.no_grad()
def solver_sample(teacher: Denoiser, scheduler, noise: Tensor, cond: Conditioning, uncond: Conditioning,
                  guidance_scale: float, steps: int) -> Tensor:
    """Sample with a diffusers `scheduler` and CFG in x0 space, the teacher called through the denoiser
    contract: each step's CFG x0 is handed to the scheduler as the epsilon it implies."""
    scheduler.set_timesteps(steps)
    schedule = teacher.schedule
    x = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        x_t = scheduler.scale_model_input(x, timestep)  # the VP sample the model sees
        level = schedule.level(timestep.double()).expand(x.shape[0]).to(x.device)
        x0_cond, x0_uncond = batched_x0(teacher, [(x_t, level, cond), (x_t, level, uncond)])
        x0 = classifier_free_guidance(x0_cond, x0_uncond, guidance_scale)
        alpha, sigma = schedule.alpha_sigma(level)
        eps = (x_t.float() - append_dims(alpha.float(), x.ndim) * x0) / append_dims(sigma.float(), x.ndim)
        x = scheduler.step(eps.to(x.dtype), timestep, x).prev_sample
    return x


@torch.no_grad()
def teacher_solver_samples(adapter, scheduler_config: dict, prompts: list[str], seed: int, guidance_scale: float,
                           solver: str, steps: int, denoiser=None, batch_size: int = 256) -> Tensor:
    """The teacher's samples for `prompts` with `solver` at `steps` steps (unclipped), noises from `seed`
    (the same noises as `metrics.teacher_samples` and the student's evaluation draw); `scheduler_config` is
    the teacher's diffusers scheduler config."""
    from .metrics import teacher_samples

    def sampler(denoiser, noise: Tensor, cond: Conditioning, uncond: Conditioning, guidance: float, count: int):
        return solver_sample(denoiser, make_scheduler(solver, scheduler_config), noise, cond, uncond, guidance, count)

    return teacher_samples(adapter, prompts, seed, guidance_scale, steps, batch_size, denoiser, sampler=sampler)
