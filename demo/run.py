"""`dmd-demo`: distil a shipped teacher (the texture world's by default, or the MNIST flow teacher) into a 4-step
student on the real trainer, and show it.

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

from .experiment import (
    BASE_SETTINGS,
    run_distillation,
    sample_student,
)
from .metrics import Evaluator
from .models import teacher_info
from .plots import save_labelled_grid, save_training_curves
from .protocol import check_training_seed, get_split
from .teacher_rows import CALL_FACTORS, TeacherRows, grid_key, plan_rows
from .worlds import flow_timesteps_matching_sdxl, get_world

logger = logging.getLogger("decoupled_dmd.demo")

# The demo's method settings per world (docs/demo.md says why). MNIST: CA + DM on a student grid with SDXL's
# signal-to-noise ratios, with the coupled (original DMD) schedule: on this teacher the benchmark's 4-step
# decoupled-hybrid student washes its last two steps out and loses to the coupled one on every seed.
DEMO_SETTINGS = dict(BASE_SETTINGS, renoise_schedule="coupled-shared",
                     student_timesteps=flow_timesteps_matching_sdxl(4), max_train_steps=200)
WORLD_DEMO_SETTINGS = {
    "mnist": DEMO_SETTINGS,
    # texture: chosen on the validation split (docs/evidence.md). Learning rate 1e-4 for 100 updates (one seed's
    # trajectory); the EMA of 0.97 from the arms over 5 training seeds: Frechet 5.43 +- 1.51 against 8.13 +- 3.99
    # without it (paired difference -2.69 [-5.82, +0.44], p = 0.075: not separated on the mean), chosen for its
    # seed spread (SD 1.5 against 4.0) and its curve, which falls at every checkpoint where the raw weights swing,
    # at no cost. DMD's regression loss (weight 1, 128 teacher pairs of the training prompts) and the fake model's
    # rate (3e-4) stay; the controls (regression only, DM only, CA only) are in docs/evidence.md.
    "texture": dict(BASE_SETTINGS, renoise_schedule="decoupled-hybrid", student_timesteps=[999, 749, 499, 249],
                    learning_rate=1e-4, fake_learning_rate=3e-4, max_train_steps=100, student_ema_decay=0.97,
                    regression_loss_weight=1.0, regression_pairs=128, regression_teacher_steps=25),
}
GRID_SEEDS = (10_100, 10_101)  # validation seeds: the grid is a picture to look at, not a reported figure


def demo_settings(world, seed: int, settings: dict | None, max_train_steps: int | None, teacher_steps: int) -> dict:
    """The trainer settings of a demo run: the world's recipe, the seed, then the caller's changes."""
    values = dict(WORLD_DEMO_SETTINGS[world.name], seed=check_training_seed(seed), **(settings or {}))
    if max_train_steps is not None:
        values["max_train_steps"] = max_train_steps
    if values.get("regression_loss_weight") and teacher_steps < values["regression_teacher_steps"]:
        values["regression_teacher_steps"] = max(2, teacher_steps)  # --teacher_steps caps every teacher sampling
    return values


def score_demo_rows(evaluator, rows: dict, prompts: list[str], described: dict, world, guidance: float) -> dict:
    """metrics.json's figures: every row scored against the reference (intervals paired with the student's row
    where the evaluator has a reference), what each row is, the shipped 50-step rows and the noise floors."""
    if evaluator.reference_features is not None:
        from .evidence import score_rows

        metrics = score_rows(evaluator, rows, prompts, compare_to="student")
    else:
        metrics = {name: evaluator(images, prompts) for name, images in rows.items()}
    for name, about in described.items():
        metrics[name].update(about)
    info = world.teacher_info()
    if "reference" in info:
        metrics["teacher_50_steps_cfg"] = info["reference"].get(f"cfg_{guidance:g}")
        metrics["teacher_50_steps_unguided"] = info["reference"].get("cfg_1")
        metrics["teacher_50_steps_note"] = ("from the shipped guidance study (about 100 samples): compare its "
                                            "Frechet with noise_floor_frechet_100, the others with noise_floor_frechet")
        metrics["noise_floor_frechet_100"] = evaluator.noise_floor(100)
    metrics["noise_floor_frechet"] = evaluator.noise_floor(len(prompts))
    metrics["noise_floor_frechet_real"] = evaluator.real_noise_floor(prompts)
    return metrics


def write_grid(path: str, trainer, sampled: dict, world, columns: list[str], guidance: float,
               teacher_steps: int) -> None:
    """grid.png: for each grid seed, the teacher at its full steps, at the student's calls and at twice them,
    then the student, on the same prompts (columns) and noises."""
    steps = len(trainer.levels)
    solver_name, nfe_steps = world.solver or "euler", max(1, steps // 2)
    grid_rows = []
    for grid_seed in GRID_SEEDS:
        student_grid = sample_student(trainer, columns, grid_seed)[-1]
        grid_rows += [
            (f"teacher {teacher_steps} steps\ncfg {guidance:g}, seed {grid_seed}",
             sampled[grid_key(grid_seed, teacher_steps, None)]),
            (f"teacher {solver_name} {nfe_steps} st.\n({2 * nfe_steps} calls), seed {grid_seed}",
             sampled[grid_key(grid_seed, nfe_steps, world.solver)]),
            (f"teacher {solver_name} {steps} st.\n({2 * steps} calls), seed {grid_seed}",
             sampled[grid_key(grid_seed, steps, world.solver)]),
            (f"student {steps} steps\n({steps} calls), seed {grid_seed}", student_grid)]
    save_labelled_grid(grid_rows, path, column_titles=[world.column_title(p) for p in columns])


def write_samples(path: str, rows: dict, prompts: list[str], noise_seed: int) -> None:
    """samples.npz: the student's and the double-calls teacher's evaluation images, for re-scoring elsewhere."""
    student = rows["student"]
    np.savez_compressed(path, student=student.clamp(-1, 1).numpy(),
                        teacher_double_calls=rows["teacher_double_calls"].clamp(-1, 1).numpy(),
                        prompts=np.array(prompts), seed=np.array(noise_seed), note=np.array(
                            f"images {tuple(student.shape)} in [-1, 1]; prompts[i] asked for image i"))


def run_demo(output_dir: str, max_train_steps: int | None = None, eval_per_prompt: int | None = None,
             seed: int = 0, teacher_dir: str | None = None, teacher_steps: int = 50, settings: dict | None = None,
             reference_file: str | None = None, should_stop=None, world="texture", split: str = "test",
             background_teacher: bool = True) -> dict:
    """Train the demo student and write the results folder; returns the metrics written to metrics.json.

    `should_stop` (checked between updates) ends training early; the results are then those of the student
    trained so far. `split` is the protocol's evaluation split (protocol.py): test for the figures a run
    reports, validation for every choice made with them. `background_teacher`: sample the teacher's rows in a
    second process while the student trains (teacher_rows.py)."""
    started = time.time()
    world = get_world(world)
    teacher_dir = teacher_dir or world.teacher_dir
    os.makedirs(output_dir, exist_ok=True)
    values = demo_settings(world, seed, settings, max_train_steps, teacher_steps)
    split = get_split(split)
    if eval_per_prompt is None:  # about 256 evaluation samples (the benchmark's evidence: 512)
        eval_per_prompt = max(1, 256 // len(world.grid_prompts()))
    evaluator = Evaluator(reference_file, world=world, split=split.name)
    training_dir = os.path.join(output_dir, "training")
    shutil.rmtree(training_dir, ignore_errors=True)  # a fresh run: the trainer would resume nothing anyway
    prompts = world.evaluation_prompts(eval_per_prompt)
    steps = len(values["student_timesteps"])
    guidance = float(values.get("guidance_scale") or teacher_info(teacher_dir).get("guidance_scale", 3.0))
    solver_name, columns = world.solver or "euler", world.grid_prompts()

    # The evaluation set: each held-out prompt `eval_per_prompt` times, one noise draw (the split's) shared by
    # all rows; the teacher at equal, double and four times the student's network calls, and the grid's teacher
    # pictures: none depends on the student, so they are sampled while it trains.
    spec_rows = plan_rows(prompts, split.noise_seed, columns, GRID_SEEDS, steps, teacher_steps, world.solver)
    described = {"student": {"steps": steps, "calls": steps, "sampler": "student"}}
    for key in CALL_FACTORS:
        count = spec_rows[key]["steps"]
        described[key] = {"steps": count, "calls": 2 * count, "sampler": f"{solver_name}, cfg {guidance:g}"}
    teacher_rows = TeacherRows({"teacher_dir": teacher_dir, "guidance": guidance, "rows": spec_rows},
                               background=background_teacher).start()
    try:
        logger.info("training: %d generator updates of a %d-step student (the bar below), then about a minute "
                    "of evaluation", values["max_train_steps"], steps)
        result, trainer = run_distillation("demo", values, training_dir, eval_every=0,
                                           eval_per_prompt=eval_per_prompt, evaluator=evaluator,
                                           teacher_dir=teacher_dir, keep_trainer=True, should_stop=should_stop,
                                           world=world, track=False)
        train_seconds = time.time() - started
        if trainer.step < values["max_train_steps"]:
            logger.info("stopped at update %d of %d: the student and a resumable state are in %s; evaluating this "
                        "student (Ctrl-C again to quit now)", trainer.step, values["max_train_steps"], training_dir)
        logger.info("evaluating: sampling %d student images, then the grid, curves and metrics", len(prompts))
        student = sample_student(trainer, prompts, split.noise_seed)[-1]
        sampled = teacher_rows.result()
    finally:
        teacher_rows.close()
    if abs(trainer.guidance_scale - guidance) > 1e-9 or len(trainer.levels) != steps:
        raise RuntimeError(f"the teacher rows were sampled at cfg {guidance:g} for {steps} steps, the trainer ran cfg "
                           f"{trainer.guidance_scale:g} for {len(trainer.levels)}")
    rows = {"student": student, **{key: sampled[key] for key in CALL_FACTORS}}
    metrics = score_demo_rows(evaluator, rows, prompts, described, world, guidance)
    protocol = split.record(prompts, world.prompts(), {name: len(images) for name, images in rows.items()})
    write_grid(os.path.join(output_dir, "grid.png"), trainer, sampled, world, columns, guidance, teacher_steps)
    entries = trainer.metrics_log.read()
    save_training_curves(entries, os.path.join(output_dir, "curves.png"),
                         title=f"dmd-demo: {values['renoise_schedule']}, {steps}-step student")
    student_file = os.path.join(output_dir, "student.safetensors")
    shutil.copyfile(result.student_file, student_file)
    write_samples(os.path.join(output_dir, "samples.npz"), rows, prompts, split.noise_seed)
    summary = {
        "protocol": protocol,
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
        "world": world.name,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def headline(summary: dict) -> list[str]:
    """The demo's claim in words: the student against the teacher at equal, double and four times its calls,
    on the split's held-out prompts, with the Frechet interval and texture accuracy of each row."""
    metrics, protocol = summary["metrics"], summary["protocol"]
    lines = [f"{protocol['split']} split: {protocol['n_per_row']['student']} samples a row of "
             f"{len(protocol['evaluated_prompts'])} held-out prompts; Frechet to the teacher's 50-step CFG samples "
             f"(noise floor {metrics['noise_floor_frechet'] or float('nan'):.2f})"]
    for name in ("student", "teacher_equal_calls", "teacher_double_calls", "teacher_4x_calls"):
        row = metrics[name]
        low, high = row.get("frechet_interval", (float("nan"), float("nan")))
        closer = row.get("closer_than_student")
        frechet, texture = row.get("frechet", float("nan")), row.get("accuracy_texture", float("nan"))
        lines.append(f"  {name:21s} {row['sampler']:18s} {row['calls']:2d} calls: Frechet {frechet:.2f} "
                     f"[{low:.2f}, {high:.2f}], texture accuracy {texture:.3f}"
                     + ("" if closer is None else f", closer than the student in {closer:.0%} of resamples"))
    return lines


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dmd-demo", description="Distil a built-in teacher into a 4-step student with Decoupled DMD and write "
                                     "pictures, curves and metrics (a few minutes on 2 CPU cores).")
    parser.add_argument("--world", default="texture", choices=("texture", "mnist"),
                        help="texture (default): shapes with fine textures, an SD-style teacher on SDXL's schedule, "
                             "where the 4-step student beats the teacher at equal cost; mnist: handwritten digits, a "
                             "flow teacher whose guidance acts only at noisy levels")
    parser.add_argument("--output_dir", default="output/dmd-demo", help="results folder (default: output/dmd-demo)")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="generator updates (default: texture "
                             f"{WORLD_DEMO_SETTINGS['texture']['max_train_steps']}, "
                             f"mnist {DEMO_SETTINGS['max_train_steps']})")
    parser.add_argument("--eval_per_prompt", type=int, default=None,
                        help="evaluation samples per held-out prompt (default: about 256 in all)")
    parser.add_argument("--teacher_steps", type=int, default=50,
                        help="steps of the teacher row of the grid (and at most those of the regression loss's "
                             "teacher samples)")
    parser.add_argument("--train_batch_size", type=int, default=None,
                        help=f"prompts per generator update (default {DEMO_SETTINGS['train_batch_size']})")
    parser.add_argument("--seed", type=int, default=0, help="training seed (0..9999; evaluation seeds are the split's)")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="evaluation split (docs/evidence.md): test for reported figures (default), validation "
                             "for choosing settings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"train_batch_size": args.train_batch_size} if args.train_batch_size else None
    from ..trainer.cli import StopOnInterrupt

    logger.info("dmd-demo: results go to %s; loading the built-in %s teacher and its classifier (Ctrl-C once "
                "stops training and still writes the results, twice quits)", os.path.abspath(args.output_dir),
                args.world)
    stop = StopOnInterrupt()
    try:
        summary = run_demo(args.output_dir, args.max_train_steps, args.eval_per_prompt, args.seed,
                           teacher_steps=args.teacher_steps, settings=settings, should_stop=stop, world=args.world,
                           split=args.split)
    except KeyboardInterrupt:
        logger.warning("dmd-demo: stopped; whatever training saved is in %s",
                       os.path.join(os.path.abspath(args.output_dir), "training"))
        return stop.exit_code
    finally:
        stop.restore()
    for line in headline(summary):
        logger.info("%s", line)
    logger.info("results in %s (%.0f s)", os.path.abspath(args.output_dir), summary["total_seconds"])
    return stop.exit_code if stop.requested else 0


if __name__ == "__main__":
    sys.exit(demo_main())


def benchmark_main(argv: list[str] | None = None) -> int:
    """`dmd-benchmark`: the research harness's benchmark (research/benchmark.py), which runs from a checkout (an
    editable install maps decoupled_dmd to it); a plain pip install does not ship the harness and says so."""
    import importlib

    try:
        module = importlib.import_module("decoupled_dmd.research.benchmark")  # by name: the product never imports it
    except ModuleNotFoundError as error:
        if "research" not in str(error):
            raise
        print("dmd-benchmark runs the research harness, which only a checkout has: clone the repository, "
              "`pip install -e .` in it, and run dmd-benchmark (or python -m decoupled_dmd.research.benchmark) "
              "there", file=sys.stderr)
        return 2
    return module.benchmark_main(argv)
