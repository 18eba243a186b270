"""Where a teacher's CFG effect lives: the CA share above each student input level, measured before training.

The decoupled-hybrid schedule re-noises the CA term only above the student's input level (tau_CA ~ U(t, 1],
Eq. 8): at a late student step the CA term can only drive what the teacher's guidance still changes at levels
cleaner than t. This measures it. The teacher's own CFG samples x are re-noised to levels tau spread over the
allowed range (the trainer's min/max timestep), and at each tau

    raw(tau)        = mean |x0_real(x_tau, cond) - x0_real(x_tau, uncond)|        (the CA direction, Eq. 6)
    normalised(tau) = mean_b( mean|CA_b| / mean|x_b - x0_cfg(x_tau)_b| )           (what DMD2's normaliser
                                                                                    makes of it)

The share at a student level t is the integral of each curve over (t, tau_max] over its integral over the
whole range (trapezoids on a uniform level grid; tau is sampled uniformly in level, so this is the share of
the expected CA magnitude that tau_CA ~ U(t, 1] can reach).
"""

from __future__ import annotations

import numpy as np
import torch

from ..trainer.denoiser import batched_x0
from ..trainer.losses import classifier_free_guidance, dmd_update_scale
from ..trainer.schedules import timestep_level_bounds


@torch.no_grad()
def ca_profile(adapter, prompts: list[str], guidance_scale: float, min_timestep: int = 20, max_timestep: int = 980,
               levels: int = 40, seed: int = 0, teacher_steps: int = 50, samples=None) -> dict:
    """raw(tau) and normalised(tau) on a uniform grid of `levels` levels over the allowed range."""
    from ..demo.metrics import teacher_samples

    schedule = adapter.schedule
    low, high = timestep_level_bounds(schedule, min_timestep, max_timestep)
    if samples is None:
        samples = teacher_samples(adapter, prompts, seed, guidance_scale, steps=teacher_steps)
    samples = samples.float()
    denoiser = adapter.denoiser()
    cond, uncond = adapter.encode_prompts(prompts), adapter.encode_prompts([""] * len(prompts))
    generator = torch.Generator().manual_seed(seed + 1)
    grid = np.linspace(low, high, levels)
    raw, normalised = [], []
    for tau in grid:
        level = torch.full((len(prompts),), float(tau), dtype=torch.float64)
        x_tau = schedule.renoise(samples, torch.randn(samples.shape, generator=generator), level)
        x0_cond, x0_uncond = batched_x0(denoiser, [(x_tau, level, cond), (x_tau, level, uncond)])
        magnitude = (x0_cond - x0_uncond).abs().flatten(1).mean(dim=1)
        scale = dmd_update_scale(samples, classifier_free_guidance(x0_cond, x0_uncond, guidance_scale))
        raw.append(magnitude.mean().item())
        normalised.append((magnitude / scale).mean().item())
    return {"levels": grid.tolist(), "raw": raw, "normalised": normalised, "guidance_scale": guidance_scale,
            "samples": len(prompts)}


def _trapezoid(values: np.ndarray, points: np.ndarray) -> float:
    return float(np.sum((values[1:] + values[:-1]) * np.diff(points)) / 2.0)


def share_above(levels, values, level: float) -> float:
    """Integral of `values` over (level, levels[-1]] divided by the integral over the whole grid (trapezoids)."""
    levels, values = np.asarray(levels, float), np.asarray(values, float)
    total = _trapezoid(values, levels)
    if level <= levels[0]:
        return 1.0
    if level >= levels[-1]:
        return 0.0
    keep = levels > level
    edge = np.interp(level, levels, values)
    part = _trapezoid(np.concatenate([[edge], values[keep]]), np.concatenate([[level], levels[keep]]))
    return float(part / total) if total > 0 else 0.0


def ca_share(adapter, prompts: list[str], guidance_scale: float, student_timesteps: list[int], **options) -> dict:
    """The profile and, per student step, its input level and the raw and normalised CA share above it."""
    profile = ca_profile(adapter, prompts, guidance_scale, **options)
    rows = []
    for index, timestep in enumerate(student_timesteps):
        level = float(adapter.schedule.level(torch.tensor(float(timestep))))
        rows.append({"step": index + 1, "timestep": int(timestep), "level": level,
                     "raw_share": share_above(profile["levels"], profile["raw"], level),
                     "normalised_share": share_above(profile["levels"], profile["normalised"], level)})
    return {**profile, "student_steps": rows}


def ca_share_markdown(results: dict[str, dict]) -> str:
    """One table per world: the share of the CA effect above each student input level."""
    lines = ["## Where the CFG effect lives (CA share above each student input level)", "",
             "Share of the integral of mean |CA(tau)| over the allowed levels that lies above the student's input "
             "level t: what tau_CA ~ U(t, 1] (decoupled-hybrid) can reach at that step. Raw, and after DMD2's "
             "normaliser. Measured on the teacher's own CFG samples, before any training.", ""]
    for world, result in results.items():
        lines += [f"**{world}** (CFG {result['guidance_scale']:g}, {result['samples']} samples, "
                  f"{len(result['levels'])} levels)", "",
                  "| student step | timestep | input level t | raw share above t | normalised share above t |",
                  "|---|---|---|---|---|"]
        for row in result["student_steps"]:
            lines.append(f"| {row['step']} | {row['timestep']} | {row['level']:.3f} | {100 * row['raw_share']:.1f}% "
                         f"| {100 * row['normalised_share']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def plot_ca_profiles(results: dict[str, dict], path: str) -> str:
    """mean |CA(tau)| (raw and normalised, each scaled to its maximum) against the level, student levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for axis, (world, result) in zip(axes[0], results.items()):
        for key, style in (("raw", "-"), ("normalised", "--")):
            values = np.asarray(result[key])
            axis.plot(result["levels"], values / max(values.max(), 1e-12), style, label=f"{key} |CA| (of max)")
        for row in result["student_steps"]:
            axis.axvline(row["level"], color="grey", lw=0.8, ls=":")
            axis.text(row["level"], 1.02, f"step {row['step']}", fontsize=7, ha="center")
        axis.set_xlabel("level tau (0 noise, 1 clean)")
        axis.set_title(world)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
