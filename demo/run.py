"""`dmd-demo`: distil the shipped MNIST flow teacher into a 4-step student on the real trainer, and show it.

Writes a results folder: grid.png (teacher 50 steps with CFG / teacher at the student's step count with CFG /
the student; same prompts and seeds), curves.png (every logged loss term, gradient norms, output mean and
variance), metrics.json, the student weights, samples.npz (raw samples and their prompts), and the trainer's
own outputs under training/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch

from .data import demo_prompts
from .experiment import (
    BASE_SETTINGS,
    EVAL_SEED,
    flow_timesteps_matching_sdxl,
    read_training_log,
    run_distillation,
    sample_student,
)
from .metrics import Evaluator, evaluation_prompts, teacher_samples
from .models import REFERENCE_FILE, TEACHER_DIR, teacher_info
from .plots import save_labelled_grid, save_training_curves

logger = logging.getLogger("decoupled_dmd.demo")

# The demo's method settings (docs/demo.md says why): CA + DM on a student grid with SDXL's signal-to-noise
# ratios, with the coupled (original DMD) schedule: on this teacher the benchmark's 4-step decoupled-hybrid
# student washes its last two steps out and loses to the coupled one on every seed.
DEMO_SETTINGS = dict(BASE_SETTINGS, renoise_schedule="coupled-shared",
                     student_timesteps=flow_timesteps_matching_sdxl(4), max_train_steps=200)
GRID_SEEDS = (0, 1)


def run_demo(output_dir: str, max_train_steps: int | None = None, eval_per_prompt: int = 50,
             seed: int = 0, teacher_dir: str = TEACHER_DIR, teacher_steps: int = 50, settings: dict | None = None,
             reference_file: str = REFERENCE_FILE, should_stop=None) -> dict:
    """Train the demo student and write the results folder; returns the metrics written to metrics.json.

    `should_stop` (checked between updates) ends training early; the results are then those of the student
    trained so far."""
    started = time.time()
    os.makedirs(output_dir, exist_ok=True)
    values = dict(DEMO_SETTINGS, seed=seed, **(settings or {}))
    if max_train_steps is not None:
        values["max_train_steps"] = max_train_steps
    evaluator = Evaluator(reference_file)
    training_dir = os.path.join(output_dir, "training")
    shutil.rmtree(training_dir, ignore_errors=True)  # a fresh run: the trainer would resume nothing anyway
    logger.info("training: %d generator updates of a %d-step student (the bar below), then about half a minute "
                "of evaluation", values["max_train_steps"], len(values["student_timesteps"]))
    result, trainer = run_distillation("demo", values, training_dir, eval_every=0, eval_per_prompt=eval_per_prompt,
                                       evaluator=evaluator, teacher_dir=teacher_dir, keep_trainer=True,
                                       should_stop=should_stop)
    train_seconds = time.time() - started
    guidance = trainer.guidance_scale
    steps = len(trainer.levels)
    if trainer.step < values["max_train_steps"]:
        logger.info("stopped at update %d of %d: the student and a resumable state are in %s; evaluating this "
                    "student (Ctrl-C again to quit now)", trainer.step, values["max_train_steps"], training_dir)
    logger.info("evaluating: sampling %d student and teacher images, then the grid, curves and metrics",
                10 * eval_per_prompt)

    # The evaluation set: the ten digit prompts, `eval_per_prompt` seeds each, one noise draw shared by all.
    prompts = evaluation_prompts(eval_per_prompt)
    teacher = trainer.denoiser("teacher")  # the base with the LoRA adapters off, as the trainer runs it
    student = sample_student(trainer, prompts, EVAL_SEED)[-1]
    teacher_few = teacher_samples(trainer.adapter, prompts, EVAL_SEED, guidance, steps=steps, denoiser=teacher)
    metrics = {"student": evaluator(student, prompts), "teacher_few_steps_cfg": evaluator(teacher_few, prompts)}
    info = teacher_info(teacher_dir)
    if "reference" in info:
        metrics["teacher_50_steps_cfg"] = info["reference"].get(f"cfg_{guidance:g}")
        metrics["teacher_50_steps_unguided"] = info["reference"].get("cfg_1")
        metrics["teacher_50_steps_note"] = ("from the shipped guidance study (100 samples): compare its Frechet "
                                            "with noise_floor_frechet_100, the others with noise_floor_frechet")
        metrics["noise_floor_frechet_100"] = evaluator.noise_floor(100)
    metrics["noise_floor_frechet"] = evaluator.noise_floor(len(prompts))

    # The grid: same prompts (columns) and seeds for the three rows of each seed.
    grid_rows = []
    for grid_seed in GRID_SEEDS:
        teacher_long = teacher_samples(trainer.adapter, demo_prompts(), grid_seed, guidance, steps=teacher_steps,
                                       denoiser=teacher)
        teacher_short = teacher_samples(trainer.adapter, demo_prompts(), grid_seed, guidance, steps=steps,
                                        denoiser=teacher)
        student_grid = sample_student(trainer, demo_prompts(), grid_seed)[-1]
        grid_rows += [(f"teacher {teacher_steps} steps\ncfg {guidance:g}, seed {grid_seed}", teacher_long),
                      (f"teacher {steps} steps\ncfg {guidance:g}, seed {grid_seed}", teacher_short),
                      (f"student {steps} steps\ncfg 1, seed {grid_seed}", student_grid)]
    save_labelled_grid(grid_rows, os.path.join(output_dir, "grid.png"),
                       column_titles=[p.split()[-1] for p in demo_prompts()])
    entries = read_training_log(trainer.logging_dir)
    save_training_curves(entries, os.path.join(output_dir, "curves.png"),
                         title=f"dmd-demo: {values['renoise_schedule']}, {steps}-step student")
    student_file = os.path.join(output_dir, "student.safetensors")
    shutil.copyfile(result.student_file, student_file)
    np.savez_compressed(os.path.join(output_dir, "samples.npz"), student=student.clamp(-1, 1).numpy(),
                        teacher_few_steps_cfg=teacher_few.clamp(-1, 1).numpy(), prompts=np.array(prompts),
                        seed=np.array(EVAL_SEED), note=np.array(
                            "images (N, 1, 28, 28) in [-1, 1], white digit on black; prompts[i] asked for image i"))
    summary = {
        "metrics": metrics,
        "settings": {k: v for k, v in result.settings.items()},
        "student_timesteps": list(trainer.config.student_timesteps),
        "guidance_scale": guidance,
        "train_steps": trainer.step,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(result.seconds_per_step, 3),
        "total_seconds": round(time.time() - started, 1),
        "eval_samples": len(prompts),
        "student_file": student_file,
        "teacher": teacher_dir,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dmd-demo", description="Distil the built-in MNIST teacher into a 4-step student with Decoupled DMD "
                                     "and write pictures, curves and metrics (a few minutes on 2 CPU cores).")
    parser.add_argument("--output_dir", default="output/dmd-demo", help="results folder (default: output/dmd-demo)")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"generator updates (default {DEMO_SETTINGS['max_train_steps']})")
    parser.add_argument("--eval_per_prompt", type=int, default=50, help="evaluation samples per digit prompt")
    parser.add_argument("--teacher_steps", type=int, default=50, help="steps of the teacher row of the grid")
    parser.add_argument("--train_batch_size", type=int, default=None,
                        help=f"prompts per generator update (default {DEMO_SETTINGS['train_batch_size']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"train_batch_size": args.train_batch_size} if args.train_batch_size else None
    from ..trainer.cli import StopOnInterrupt

    logger.info("dmd-demo: results go to %s; loading the built-in MNIST teacher and its classifier (Ctrl-C once "
                "stops training and still writes the results, twice quits)", os.path.abspath(args.output_dir))
    stop = StopOnInterrupt()
    try:
        summary = run_demo(args.output_dir, args.max_train_steps, args.eval_per_prompt, args.seed,
                           teacher_steps=args.teacher_steps, settings=settings, should_stop=stop)
    except KeyboardInterrupt:
        logger.warning("dmd-demo: stopped; whatever training saved is in %s",
                       os.path.join(os.path.abspath(args.output_dir), "training"))
        return 130
    finally:
        stop.restore()
    student, teacher = summary["metrics"]["student"], summary["metrics"].get("teacher_50_steps_cfg") or {}
    logger.info("student (%d steps, cfg 1): adherence %.3f, top-1 %.3f, Frechet %.2f (noise floor %.2f); "
                "teacher 50 steps cfg %.1f: adherence %.3f", len(summary["student_timesteps"]),
                student["adherence"], student["top1"], student.get("frechet", float("nan")),
                summary["metrics"]["noise_floor_frechet"] or float("nan"), summary["guidance_scale"],
                teacher.get("adherence", float("nan")))
    logger.info("results in %s (%.0f s)", os.path.abspath(args.output_dir), summary["total_seconds"])
    return 130 if stop.requested else 0


if __name__ == "__main__":
    sys.exit(demo_main())
