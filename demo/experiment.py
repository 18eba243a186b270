"""One distillation of the demo teacher on the real trainer, evaluated over iterations: shared by
`dmd-demo` and `dmd-benchmark`.

The student is trained by `DecoupledDMDTrainer` exactly as `dmd-distill` would train it; an `on_step`
callback samples it every `eval_every` generator updates with a fixed seed and scores the samples (after every
student step, so a late step that ruins good images shows) with the shipped classifier.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..trainer.config import config_from_dict
from ..trainer.loop import DecoupledDMDTrainer, TrainerCallbacks
from .metrics import Evaluator, image_statistics
from .models import teacher_info
from .protocol import VALIDATION
from .worlds import get_world

logger = logging.getLogger(__name__)

EVAL_SEED = VALIDATION.noise_seed  # every evaluation during training is for choosing: validation noises (protocol.py)


# Settings every demo and benchmark run shares unless overridden (chosen with the benchmark; docs/demo.md).
# Full copies, not LoRA: on a 0.4 M-parameter UNet the LoRA kernels cost more time than they save memory
# (the cost benchmark measures LoRA mode). lr 1e-3 was unstable for every schedule; 1e-4 is not. Five fake
# updates per generator update (DMD2's TTUR, the trainer's default): with two, the fake model lagged and the
# coupled student ended at Frechet 51-72 after 150 updates; with five, 36-56.
BASE_SETTINGS = dict(
    renoise_schedule="decoupled-hybrid", regularizer="dm", cfg_augmentation=True,
    update_normalization="per_term", training_mode="full", network_dim=8, network_alpha=8.0,
    learning_rate=1e-4, fake_learning_rate=1e-4, fake_updates_per_step=5, train_batch_size=8,
    max_grad_norm=10.0, weight_decay=0.0, log_with="none", min_timestep=20, max_timestep=980,
    mean_variance_target_mean=-0.74, mean_variance_target_var=0.40,
)


@dataclass
class RunResult:
    name: str
    settings: dict
    history: list[dict] = field(default_factory=list)  # one entry per evaluation: step and metrics
    same_input: list[dict] = field(default_factory=list)  # the final student against the teacher, step by step
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    student_file: str = ""
    output_dir: str = ""

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {"name": self.name, "settings": self.settings, "history": self.history, "same_input": self.same_input,
                "seconds": self.seconds,
                "seconds_per_step": self.seconds_per_step, "student_file": self.student_file}


def student_trajectory(denoiser, noise: Tensor, levels: list[float], cond, generator: torch.Generator) -> list[Tensor]:
    """The x0 prediction (unclipped) after every student step of the trainer's own few-step sampler."""
    from ..trainer.sampling import few_step_sample

    outputs: list[Tensor] = []
    few_step_sample(denoiser, noise, levels, cond, generator=generator, callback=lambda index, x0: outputs.append(x0))
    return outputs


@torch.no_grad()
def sample_student(trainer: DecoupledDMDTrainer, prompts: list[str], seed: int) -> list[Tensor]:
    """Student samples (model range) for `prompts` after each of its steps, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *trainer.latent_shape), generator=generator)
    cond = trainer.conditioning(prompts)
    with trainer.student_in_use():
        return student_trajectory(trainer.denoiser("student"), noise, trainer.levels, cond, generator)


class _RecordingDenoiser:
    """A denoiser that keeps every input it is called with (the student's own inputs, step by step)."""

    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.inputs = denoiser, denoiser.schedule, []

    def __call__(self, x_t: Tensor, level: Tensor, cond) -> Tensor:
        self.inputs.append((x_t, level))
        return self.denoiser(x_t, level, cond)


@torch.no_grad()
def same_input_comparison(trainer: DecoupledDMDTrainer, evaluator: Evaluator, prompts: list[str],
                          seed: int = EVAL_SEED) -> list[dict]:
    """Per student step, on the student's own input of that step: metrics of the student's x0, the teacher's
    conditional x0 and the teacher's CFG x0. A step whose student output is worse than the teacher's on the
    same input is a bad step; one where the teacher is bad too was handed a bad input."""
    from ..trainer.denoiser import batched_x0
    from ..trainer.losses import classifier_free_guidance
    from ..trainer.sampling import few_step_sample

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *trainer.latent_shape), generator=generator)
    cond, uncond = trainer.conditioning(prompts), trainer.uncond(len(prompts))
    recorder, outputs = _RecordingDenoiser(trainer.denoiser("student")), []
    with trainer.student_in_use():
        few_step_sample(recorder, noise, trainer.levels, cond, generator=generator,
                        callback=lambda index, x0: outputs.append(x0))
    teacher, rows = trainer.denoiser("teacher"), []
    for index, ((x_t, level), student_x0) in enumerate(zip(recorder.inputs, outputs)):
        x0_cond, x0_uncond = batched_x0(teacher, [(x_t, level, cond), (x_t, level, uncond)])
        x0_cfg = classifier_free_guidance(x0_cond, x0_uncond, trainer.guidance_scale)
        rows.append({"step": index + 1, "level": float(level[0]), "student": evaluator(student_x0, prompts),
                     "teacher_cond": evaluator(x0_cond, prompts), "teacher_cfg": evaluator(x0_cfg, prompts)})
    return rows


def evaluate_student(trainer, evaluator: Evaluator, prompts: list[str], seed: int = EVAL_SEED) -> dict:
    """Metrics of the final samples, plus adherence and image statistics after every intermediate step."""
    steps = sample_student(trainer, prompts, seed)
    metrics = evaluator(steps[-1], prompts)
    if len(steps) > 1:
        for index, x0 in enumerate(steps[:-1]):
            partial = evaluator(x0, prompts)
            metrics[f"step{index + 1}_adherence"] = partial["adherence"]
            metrics[f"step{index + 1}_frechet"] = partial.get("frechet", float("nan"))
            metrics.update({f"step{index + 1}_{k}": v for k, v in image_statistics(x0).items()})
    return metrics


def make_config(output_dir: str, prompt_file: str, settings: dict, teacher_dir: str | None = None, world="mnist"):
    world = get_world(world)
    teacher_dir = teacher_dir or world.teacher_dir
    values = dict(BASE_SETTINGS, **world.settings)
    values["guidance_scale"] = teacher_info(teacher_dir).get("guidance_scale", 3.0)
    values.update(settings)
    values.update(pretrained_model_name_or_path=teacher_dir, output_dir=output_dir, prompt_file=prompt_file)
    return config_from_dict(values)


def run_distillation(name: str, settings: dict, output_dir: str, eval_every: int = 0, eval_per_prompt: int = 20,
                     evaluator: Evaluator | None = None, teacher_dir: str | None = None,
                     keep_trainer: bool = False, should_stop=None, world="mnist", track: bool = True):
    """Distil a world's teacher with `settings` (TrainConfig keys over BASE_SETTINGS and the world's own);
    evaluate as it trains (and, with `track`, before the first update and after the last, with the same-input
    comparison; `dmd-demo` scores its student itself and skips them).

    Returns a `RunResult` (and the trainer when `keep_trainer`).
    """
    from ..trainer.adapters.diffusers import DiffusersAdapter

    world = get_world(world)
    teacher_dir = teacher_dir or world.teacher_dir
    os.makedirs(output_dir, exist_ok=True)
    prompt_file = os.path.join(output_dir, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(world.prompts()) + "\n")
    config = make_config(output_dir, prompt_file, settings, teacher_dir, world)
    evaluator = evaluator or Evaluator(world=world)
    prompts = world.evaluation_prompts(eval_per_prompt)
    result = RunResult(name, {k: v for k, v in config.to_dict().items()
                              if k in BASE_SETTINGS or k in settings or k in world.settings}, output_dir=output_dir)
    holder: dict = {}

    def on_step(step: int, logs: dict) -> None:
        if eval_every and step % eval_every == 0 and step < config.max_train_steps:
            result.history.append({"step": step, **evaluate_student(holder["trainer"], evaluator, prompts)})

    adapter = DiffusersAdapter.from_pretrained(teacher_dir)
    trainer = DecoupledDMDTrainer(config, adapter, world.prompts(), world.grid_prompts(),
                                  callbacks=TrainerCallbacks(on_step=on_step,
                                                             should_stop=should_stop or (lambda: False)))
    holder["trainer"] = trainer
    started = time.time()
    if track:
        result.history.append({"step": 0, **evaluate_student(trainer, evaluator, prompts)})
    result.student_file = trainer.train()
    if track:
        result.history.append({"step": trainer.step, **evaluate_student(trainer, evaluator, prompts)})
        result.same_input = same_input_comparison(trainer, evaluator, prompts)
    result.seconds = time.time() - started
    result.seconds_per_step = trainer.metrics_log.last("seconds_per_step", 0.0)
    return (result, trainer) if keep_trainer else result


