"""The evidence a quality claim rests on (issue 27's protocol): the reference per split, the teacher with the
solvers creators use, and rows scored with intervals.

    python -m decoupled_dmd.demo.evidence reference            # the shipped texture reference (both splits)
    python -m decoupled_dmd.demo.evidence solvers --split test  # the teacher's quality against network calls

Every row is n samples of the held-out prompts (`n_per_prompt` each) from the split's noise seed; its Frechet
distance to the split's reference (the teacher's 50-step DDIM CFG samples from the reference seed) carries a
paired bootstrap interval, and its accuracies a bootstrap interval; the texture is read twice, by the
instrument's head and by the classifier-free spectrum reader (texture.read_texture).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor

from .metrics import TEACHER_STEPS, Evaluator, teacher_samples
from .protocol import SPLITS, get_split
from .stats import (
    effective_rank,
    frechet_from_features,
    interval,
    paired_bootstrap_frechet,
    paired_bootstrap_mean,
    recentre,
)

logger = logging.getLogger("decoupled_dmd.evidence")

N_PER_PROMPT = 32  # 16 held-out prompts x 32 = 512 samples a row
SOLVER_STEPS = {"dpmpp_2m": (2, 3, 4, 6, 8, 12, 16, 25), "ddim": (2, 4, 8, 16), "euler": (2, 4, 8, 16),
                "unipc": (2, 4, 8)}


def file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def build_reference(world="texture", per_prompt: int = N_PER_PROMPT, steps: int = TEACHER_STEPS,
                    output: str | None = None, samples_dir: str | None = None) -> dict:
    """The teacher's `steps`-step DDIM CFG samples of the held-out prompts from each split's reference seed, as
    instrument features per sample (`<split>_features`); each split's set is the other's noise-floor set.
    `samples_dir` keeps (and reuses) the raw samples, so a retrained instrument needs no new teacher calls."""
    from safetensors.torch import save_file

    from ..trainer.adapters.diffusers import DiffusersAdapter
    from .models import teacher_info
    from .worlds import get_world

    world = get_world(world)
    output = output or world.reference_file
    adapter = DiffusersAdapter.from_pretrained(world.teacher_dir)
    guidance = teacher_info(world.teacher_dir).get("guidance_scale", 3.0)
    evaluator = Evaluator(reference_file="", world=world)
    prompts = world.evaluation_prompts(per_prompt)
    tensors, summary = {}, {}
    for name, split in SPLITS.items():
        cached = os.path.join(samples_dir, f"reference_{name}.pt") if samples_dir else None
        if cached and os.path.isfile(cached):
            images = torch.load(cached)
        else:
            started = time.time()
            images = teacher_samples(adapter, prompts, split.reference_seed, guidance, steps)
            logger.info("%s reference: %d samples in %.0f s", name, len(images), time.time() - started)
            if cached:
                os.makedirs(samples_dir, exist_ok=True)
                torch.save(images, cached)
        tensors[f"{name}_features"] = evaluator.classify(images)[1].float().contiguous()
        summary[name] = evaluator(images, prompts)
    validation, test = (tensors[f"{n}_features"].double().numpy() for n in ("validation", "test"))
    floor = frechet_from_features(validation, test)
    metadata = {"guidance_scale": str(guidance), "teacher_steps": str(steps), "sampler": "ddim (cfg_sample)",
                "per_prompt": str(per_prompt), "prompts": json.dumps(list(dict.fromkeys(prompts))),
                "reference_seeds": json.dumps({n: s.reference_seed for n, s in SPLITS.items()}),
                "classifier_sha256": file_sha256(world.classifier_file), "world": world.name,
                "noise_floor": str(floor), "effective_rank": str(effective_rank(np.cov(validation, rowvar=False)))}
    save_file(tensors, output, metadata=metadata)
    logger.info("reference written to %s: floor %.3f, effective rank %s", output, floor, metadata["effective_rank"])
    return {"metadata": metadata, "teacher_50_steps": summary}


def score_rows(evaluator: Evaluator, rows: dict[str, Tensor], prompts: list[str], compare_to: str | None = None,
               resamples: int = 200) -> dict:
    """Every row's metrics with intervals: Frechet to the split's reference (paired bootstrap), texture accuracy
    by the head and by the spectrum reader, top-1 (bootstrap); with `compare_to`, each row's Frechet minus that
    row's on the same draws (its interval, and how often the row is the closer)."""
    if evaluator.reference_features is None:
        raise ValueError("score_rows needs a protocol reference (per-split features): run "
                         "`python -m decoupled_dmd.demo.evidence reference`")
    features, out = {}, {}
    for name, images in rows.items():
        metrics, per_sample = evaluator.score(images, prompts)
        features[name] = per_sample["features"].double().numpy()
        metrics.update(accuracy_texture_interval=paired_bootstrap_mean(per_sample["texture"].numpy()),
                       texture_spectrum_accuracy_interval=paired_bootstrap_mean(per_sample["texture_spectrum"].numpy()),
                       top1_interval=paired_bootstrap_mean(per_sample["top1"].numpy()), n=len(images))
        out[name] = metrics
    draws = paired_bootstrap_frechet(features, evaluator.reference_features, resamples)
    for name, values in draws.items():
        out[name]["frechet_interval"] = interval(recentre(values, out[name]["frechet"]))
        if compare_to and name != compare_to:
            estimate = float(out[name]["frechet"] - out[compare_to]["frechet"])
            difference = recentre(values - draws[compare_to], estimate)
            out[name][f"frechet_minus_{compare_to}"] = estimate
            out[name][f"frechet_minus_{compare_to}_interval"] = interval(difference)
            out[name][f"closer_than_{compare_to}"] = float((difference < 0).mean())
    return out


def solver_rows(world, split_name: str, per_prompt: int = N_PER_PROMPT, solver_steps: dict | None = None,
                include_student_grid: bool = True) -> dict[str, Tensor]:
    """The teacher with each solver and step count (CFG, two calls a step), and on the student's own 4-step grid
    at cfg 1 (one call a step), from the split's noise seed."""
    from ..trainer.adapters.diffusers import DiffusersAdapter, read_scheduler_config
    from ..trainer.sampling import few_step_sample, student_levels
    from .models import teacher_info
    from .solvers import teacher_solver_samples

    split = get_split(split_name)
    adapter = DiffusersAdapter.from_pretrained(world.teacher_dir)
    config = read_scheduler_config(world.teacher_dir, True)
    guidance = teacher_info(world.teacher_dir).get("guidance_scale", 3.0)
    prompts = world.evaluation_prompts(per_prompt)
    rows = {}
    for solver, counts in (solver_steps or SOLVER_STEPS).items():
        for steps in counts:
            started = time.time()
            rows[f"{solver} {steps} steps ({2 * steps} calls)"] = teacher_solver_samples(
                adapter, config, prompts, split.noise_seed, guidance, solver, steps)
            logger.info("%s %d steps: %.0f s", solver, steps, time.time() - started)
    if include_student_grid:
        generator = torch.Generator().manual_seed(split.noise_seed)
        noise = torch.randn((len(prompts), *adapter.latent_shape(*adapter.default_resolution)), generator=generator)
        with torch.no_grad():
            rows["teacher on the student grid, cfg 1 (4 calls)"] = few_step_sample(
                adapter.denoiser(), noise, student_levels(adapter.schedule, world.student_timesteps(4)),
                adapter.encode_prompts(prompts), generator=generator)
    return rows


def parse_solvers(text: str) -> dict[str, tuple[int, ...]]:
    """'dpmpp_2m:2,4,8;ddim:4' -> {'dpmpp_2m': (2, 4, 8), 'ddim': (4,)}, or a ValueError saying the form."""
    from .solvers import SOLVERS

    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, counts = part.partition(":")
        if name not in SOLVERS or not counts:
            raise ValueError(f"--solvers part {part!r}: write solver:steps,steps with a solver of {', '.join(SOLVERS)}")
        out[name] = tuple(int(c) for c in counts.split(","))
    return out


def calls_of(row: str) -> int | None:
    """The network calls a row name states ('... (8 calls)')."""
    if "(" not in row or "calls)" not in row:
        return None
    return int(row.rsplit("(", 1)[1].split()[0])


def evidence_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decoupled_dmd.demo.evidence", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="build the shipped reference (both splits)")
    ref.add_argument("--samples_dir", default=None, help="keep / reuse the raw reference samples here")
    ref.add_argument("--output", default=None)
    sol = sub.add_parser("solvers", help="score the teacher with every solver and step count")
    sol.add_argument("--split", default="validation", choices=tuple(SPLITS))
    sol.add_argument("--output", default="output/evidence")
    sol.add_argument("--samples_dir", default=None, help="keep / reuse the raw samples here")
    sol.add_argument("--solvers", default=None,
                     help="which solvers and step counts, e.g. 'dpmpp_2m:2,4,8;ddim:4' (default: "
                          + "; ".join(f"{k}:{','.join(map(str, v))}" for k, v in SOLVER_STEPS.items()) + ")")
    for p in (ref, sol):
        p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .worlds import get_world

    world = get_world("texture")
    if args.command == "reference":
        summary = build_reference(world, output=args.output, samples_dir=args.samples_dir)
        print(json.dumps(summary["metadata"], indent=2))
        return 0
    os.makedirs(args.output, exist_ok=True)
    cached = os.path.join(args.samples_dir, f"solvers_{args.split}.pt") if args.samples_dir else None
    if cached and os.path.isfile(cached):
        rows = torch.load(cached)
    else:
        rows = solver_rows(world, args.split, solver_steps=parse_solvers(args.solvers) if args.solvers else None)
        if cached:
            os.makedirs(args.samples_dir, exist_ok=True)
            torch.save(rows, cached)
    evaluator = Evaluator(world=world, split=args.split)
    prompts = world.evaluation_prompts(N_PER_PROMPT)
    scores = score_rows(evaluator, rows, prompts)
    for name, metrics in scores.items():
        metrics["calls"] = calls_of(name)
    result = {"protocol": get_split(args.split).record(prompts, world.prompts(), {k: len(v) for k, v in rows.items()}),
              "noise_floor": evaluator.noise_floor(len(prompts)), "rows": scores}
    with open(os.path.join(args.output, f"solvers_{args.split}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    from .plots import save_quality_against_calls

    save_quality_against_calls(scores, os.path.join(args.output, f"solvers_{args.split}.png"), result["noise_floor"])
    for name, metrics in scores.items():
        low, high = metrics["frechet_interval"]
        print(f"{name:48s} Frechet {metrics['frechet']:7.2f} [{low:6.2f}, {high:6.2f}]  texture "
              f"{metrics['accuracy_texture']:.3f} (spectrum {metrics['texture_spectrum_accuracy']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(evidence_main())
