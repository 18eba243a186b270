"""DMD's regression loss (Yin et al. 2024), beside the student's update: weight * MSE between the student's first
step on a fixed set of noises and the teacher's CFG samples from those same noises and prompts."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from .losses import per_image_statistics
from .sampling import cfg_sample

logger = logging.getLogger(__name__)


class RegressionLoss:
    """The pairs (prompts, noises, teacher CFG samples) are made once per run (`prepare`, before the first update)
    from their own generator seeded by `seed`, so a resumed run and every process rebuild the same pairs; each
    student update then adds `backward`'s gradient to its own (`accumulate`)."""

    def __init__(self, config):
        self.weight = config.regression_loss_weight
        self.count, self.teacher_steps = config.regression_pairs, config.regression_teacher_steps
        self.seed, self.batch = config.seed, config.train_batch_size
        self.pairs: tuple[list[str], Tensor, Tensor] | None = None

    def prepare(self, run) -> bool:
        """Make the pairs once (the loop does it before the first update, outside every update's cost; a direct
        `train_step` on the first call); False when a stop came before they were done."""
        if self.pairs is None:
            with run.meter.phase("regression_pairs"):
                self.pairs = self.make_pairs(run)
        return self.pairs is not None

    @torch.no_grad()
    def make_pairs(self, run) -> tuple[list[str], Tensor, Tensor] | None:
        """(prompts, noises, teacher CFG samples) on the CPU. Minutes on SDXL: reports its progress as a phase and
        returns None when a stop is requested before it is done."""
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(self.seed + 0x5EED)
        indices = torch.randint(len(run.prompts), (self.count,), generator=generator).tolist()
        prompts = [run.prompts[i] for i in indices]
        noise = torch.randn((self.count, *run.latent_shape), generator=generator)
        teacher, samples, device = run.denoiser("teacher"), [], run.accelerator.device
        started = time.perf_counter()
        with run.eager_calls():  # one-off calls: no CUDA graphs outside the planned pool
            for start in tqdm(range(0, self.count, self.batch), desc="regression loss: teacher samples",
                              unit="batch", disable=run.progress_disabled()):
                if run.callbacks.should_stop():
                    logger.info("stop requested while making the regression loss's teacher samples")
                    return None
                run.callbacks.on_phase(f"regression loss: teacher sample {start + 1} of {self.count} "
                                       f"({self.teacher_steps} steps with CFG each, once per run)")
                chunk = prompts[start:start + self.batch]
                with run.accelerator.autocast():
                    samples.append(cfg_sample(teacher, noise[start:start + len(chunk)].to(device),
                                              run.conditioning(chunk), run.uncond(len(chunk)),
                                              run.guidance_scale, self.teacher_steps).float().cpu())
        logger.info("regression loss: %d teacher samples (%d DDIM steps with CFG) in %.1f s", self.count,
                    self.teacher_steps, time.perf_counter() - started)
        return prompts, noise, torch.cat(samples)

    def backward(self, run, statistics: bool = False) -> dict[str, float]:
        """Backward of weight * MSE on a random batch of the pairs, before the student's own sample: the gradient
        stays in the student's .grad for the update to add to (one trained call alive at a time: the memory
        plan's peak holds). Returns the unweighted loss's log; `statistics`: also the first step's image
        statistics (the regression-only control has no generator sample)."""
        if not self.prepare(run):  # stopped while making them: the loop ends at its next check
            return {}
        prompts, noise, target = self.pairs
        indices = torch.randint(len(prompts), (self.batch,), generator=run.random.generator).tolist()
        device = run.accelerator.device
        with run.meter.phase("generator_regression"):
            cond = run.conditioning([prompts[i] for i in indices])
            x0 = run.x0("student", noise[indices].to(device), run.level(run.levels[0], self.batch), cond, train=True)
            loss = torch.nn.functional.mse_loss(x0.float(), target[indices].to(device).float())
            run.backward("student", self.weight * loss)
        return {"loss_regression": loss.item(), **(per_image_statistics(x0) if statistics else {})}
