"""`dmd-benchmark`: the paper's ablations on the real trainer with the demo teacher, and the cost of LoRA mode.

Quality: 1-, 2- and 4-step students, several seeds, mean and spread of the classifier metrics (prompt
adherence, Frechet distance to the teacher's CFG samples, saturation) over training, for
- the four re-noising schedules (Table 1: coupled-shared, decoupled-full, decoupled-constrained, decoupled-hybrid);
- CA + DM, CA only, DM only, CA + mean-variance KL (Fig. 2 and 3);
- the update normalisation: per_term, per_term_cfg (DMD2's at each term's level), none, shared;
- a guidance sweep (the CA term's alpha) for decoupled-hybrid and coupled-shared.
Before any training it measures where each teacher's CFG effect lives (the CA share above each student
input level, ca_share.py), and after training compares each student step with the teacher on the same input.
Runs go two at a time (one CPU thread each) in worker processes; each run's result is a JSON file, so an
interrupted benchmark continues where it stopped. Writes benchmark.md (tables and gates) and PNG plots.

Cost: seconds per generator update and peak memory of LoRA mode against the naive full-copy mode
(see `cost.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

from ..trainer.config import OPTIMIZERS
from .runs import _is_late, _write_json, _write_text, late_mean, run_jobs

logger = logging.getLogger("decoupled_dmd.benchmark")

BASELINE = "decoupled-hybrid"  # CA + DM, per_term: the row each group is compared with
VARIANTS = {
    "coupled-shared": ("schedule", {"renoise_schedule": "coupled-shared"}),
    "decoupled-full": ("schedule", {"renoise_schedule": "decoupled-full"}),
    "decoupled-constrained": ("schedule", {"renoise_schedule": "decoupled-constrained"}),
    "decoupled-hybrid": ("schedule", {"renoise_schedule": "decoupled-hybrid"}),
    "CA only": ("regularizer", {"regularizer": "none"}),
    "DM only": ("regularizer", {"cfg_augmentation": False}),
    "CA + mean-variance KL": ("regularizer", {"regularizer": "mean_variance"}),
    "normalization none": ("normalization", {"update_normalization": "none"}),
    "normalization shared": ("normalization", {"update_normalization": "shared"}),
    "normalization per_term_cfg": ("normalization", {"update_normalization": "per_term_cfg"}),
    # the guidance sweep (alpha of the CA term; the teacher's recommended scale is the baseline's)
    "hybrid cfg 2": ("guidance", {"guidance_scale": 2.0}),
    "hybrid cfg 5": ("guidance", {"guidance_scale": 5.0}),
    "coupled cfg 2": ("guidance", {"renoise_schedule": "coupled-shared", "guidance_scale": 2.0}),
    "coupled cfg 5": ("guidance", {"renoise_schedule": "coupled-shared", "guidance_scale": 5.0}),
    # the speed options that change the random stream (not the math), on the coupled schedule
    "coupled + batch_fake_samples": ("speed options", {"renoise_schedule": "coupled-shared",
                                                      "batch_fake_samples": True}),
    "coupled + batched + share_generator_sample": ("speed options", {"renoise_schedule": "coupled-shared",
                                                                    "batch_fake_samples": True,
                                                                    "share_generator_sample": True}),
}
# With one student step (t = 0) every constrained range is the full range: those schedules equal
# decoupled-full there and are not run twice.
ONE_STEP_SKIP = ("decoupled-full", "decoupled-constrained")

MODES = {
    "quick": dict(student_steps=(4,), variants=("coupled-shared", "decoupled-full", "decoupled-constrained",
                                                 "decoupled-hybrid"),
                  seeds=3, max_train_steps=60, eval_every=20, eval_per_prompt=20),
    "full": dict(student_steps=(4, 1, 2), variants=tuple(VARIANTS), seeds=3, max_train_steps=80, eval_every=20,
                 eval_per_prompt=20, one_step_variants=("coupled-shared", "decoupled-hybrid", "CA only", "DM only"),
                 two_step_variants=("coupled-shared", "decoupled-full", "decoupled-constrained", "decoupled-hybrid")),
}
TABLE_METRICS = (("adherence", "adherence", "{:.3f}"), ("top1", "top-1", "{:.3f}"),
                 ("frechet", "Frechet to teacher CFG", "{:.1f}"), ("frechet_real", "Frechet to real", "{:.1f}"),
                 ("accuracy_texture", "texture acc.", "{:.3f}"), ("hf_energy_ratio", "fine energy / real", "{:.2f}"),
                 ("saturation", "saturation", "{:.3f}"), ("image_var", "var", "{:.3f}"))


def grid_for(steps: int, grid: str) -> list[int]:
    from ..demo.worlds import flow_timesteps_matching_sdxl, shifted_flow_timesteps

    if grid == "sdxl":
        return flow_timesteps_matching_sdxl(steps)
    if grid == "shift3":
        return shifted_flow_timesteps(steps, 3.0)
    if grid == "uniform":
        return shifted_flow_timesteps(steps, 1.0)
    raise ValueError(f"unknown grid {grid!r}; choose sdxl, shift3 or uniform")


def plan_jobs(mode: dict, output_dir: str, grid: str, world: str = "mnist") -> list[dict]:
    """The training runs of `mode`; the student grids are the world's own (SDXL's for the texture world's SD
    teacher; `grid` for the MNIST flow teacher)."""
    from ..demo.worlds import get_world

    timesteps = (lambda steps: grid_for(steps, grid)) if world == "mnist" else get_world(world).student_timesteps
    jobs = []
    for steps in mode["student_steps"]:
        for name in mode["variants"]:
            if steps == 1 and (name in ONE_STEP_SKIP or name not in mode.get("one_step_variants", VARIANTS)):
                continue
            if steps == 2 and name not in mode.get("two_step_variants", VARIANTS):
                continue
            _, settings = VARIANTS[name]
            for seed in range(mode["seeds"]):
                folder = os.path.join(output_dir, "runs", f"{steps}step", name.replace(" ", "_").replace("+", "plus"),
                                      f"seed{seed}")
                jobs.append({"name": name, "steps": steps, "seed": seed, "folder": folder, "world": world,
                             "settings": dict(mode.get("overrides", {}), **settings, seed=seed,
                                              student_timesteps=timesteps(steps),
                                              max_train_steps=mode["max_train_steps"],
                                              **({"train_batch_size": mode["train_batch_size"]}
                                                 if mode.get("train_batch_size") else {})),
                             "eval_every": mode["eval_every"], "eval_per_prompt": mode["eval_per_prompt"]})
    return jobs


def _mean_spread(values: list[float]) -> tuple[float, float, float, float]:
    array = np.asarray(values, dtype=float)
    return float(np.mean(array)), float(np.std(array)), float(np.min(array)), float(np.max(array))


SAME_INPUT_ROLES = ("student", "teacher_cond", "teacher_cfg")


def _same_input_means(runs: list[dict]) -> list[dict]:
    """Per student step, the seeds' mean Frechet (to the teacher's CFG samples) and adherence of the student,
    the conditional teacher and the CFG teacher on the student's own input."""
    per_run = [r.get("same_input") or [] for r in runs]
    if not per_run or not all(per_run):
        return []
    out = []
    for index in range(min(len(p) for p in per_run)):
        entry = {"step": index + 1}
        for role in SAME_INPUT_ROLES:
            for key in ("frechet", "adherence", "accuracy_texture"):
                values = [p[index][role].get(key) for p in per_run]
                if all(v is not None for v in values):
                    entry[f"{role}_{key}"] = float(np.mean(values))
        out.append(entry)
    return out


def late_steps(mode: dict) -> str:
    """The evaluation steps `late_mean` averages for this mode's runs."""
    last, every = mode["max_train_steps"], mode["eval_every"] or mode["max_train_steps"]
    steps = [s for s in range(every, last, every) if _is_late(s, last)] + [last]
    return ", ".join(map(str, steps))


def summarize(results: list[dict], floor: float | None) -> dict:
    """Per (steps, variant): the late metrics' mean, std, min, max over seeds, and the pairwise gates."""
    table: dict = {}
    for data in results:
        key = (data["steps"], data["name"])
        table.setdefault(key, []).append(data)
    summary = {"rows": {}, "gates": []}
    for (steps, name), runs in sorted(table.items(), key=lambda item: (item[0][0], list(VARIANTS).index(item[0][1]))):
        row = {"steps": steps, "name": name, "group": VARIANTS[name][0], "seeds": len(runs),
               "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs]))}
        finals = [late_mean(r["history"]) for r in runs]
        for key in [k for k in finals[0] if isinstance(finals[0][k], (int, float))]:
            row[key] = _mean_spread([f.get(key, math.nan) for f in finals])
        row["same_input"] = _same_input_means(runs)
        row["per_seed_frechet"] = {r["seed"]: f.get("frechet") for r, f in zip(runs, finals)}
        row["per_seed_adherence"] = {r["seed"]: f.get("adherence") for r, f in zip(runs, finals)}
        row["late_steps"] = sorted({h["step"] for r in runs for h in r["history"]
                                    if _is_late(h["step"], r["history"][-1]["step"]) and h["step"] > 0})
        summary["rows"][f"{steps}|{name}"] = row
    summary["gates"] = gates(summary["rows"], floor)
    return summary


def gates(rows: dict, floor: float | None) -> list[dict]:
    """The paper's claims, checked per seed where they can be: each gate says what held on this toy."""
    out = []

    def row(steps, name):
        return rows.get(f"{steps}|{name}")

    for steps in (1, 2, 4):
        coupled, hybrid = row(steps, "coupled-shared"), row(steps, BASELINE)
        if coupled and hybrid:
            seeds = sorted(set(coupled["per_seed_frechet"]) & set(hybrid["per_seed_frechet"]))
            wins = [hybrid["per_seed_frechet"][s] <= coupled["per_seed_frechet"][s] * 1.10 for s in seeds]
            out.append({"claim": f"{steps}-step: decoupled-hybrid matches or beats coupled-shared (Frechet within "
                                 f"10% or lower) on every seed", "passed": all(wins),
                        "detail": f"{sum(wins)}/{len(wins)} seeds; hybrid {hybrid['frechet'][0]:.1f} vs coupled "
                                  f"{coupled['frechet'][0]:.1f}"})
            collapsed = hybrid["saturation"][3] > 0.5 or (floor and hybrid["frechet"][3] > 20 * max(floor, 1.0))
            out.append({"claim": f"{steps}-step: decoupled-hybrid does not collapse on any seed",
                        "passed": not collapsed,
                        "detail": f"worst seed: Frechet {hybrid['frechet'][3]:.1f}, saturation "
                                  f"{hybrid['saturation'][3]:.3f}"})
        ca_only, dm_only = row(steps, "CA only"), row(steps, "DM only")
        if ca_only and dm_only:
            out.append({"claim": f"{steps}-step: CA is the engine (CA only follows the prompt better than DM only)",
                        "passed": ca_only["adherence"][0] > dm_only["adherence"][0],
                        "detail": f"adherence CA only {ca_only['adherence'][0]:.3f}, DM only "
                                  f"{dm_only['adherence'][0]:.3f}"})
        if ca_only and hybrid:
            out.append({"claim": f"{steps}-step: DM regularises CA (CA + DM closer to the teacher than CA only)",
                        "passed": hybrid["frechet"][0] <= ca_only["frechet"][0],
                        "detail": f"Frechet CA + DM {hybrid['frechet'][0]:.1f}, CA only {ca_only['frechet'][0]:.1f}"})
    return out


WORLD_TEACHERS = {"mnist": "the built-in MNIST flow teacher",
                  "texture": "the texture world's SD-style epsilon teacher (SDXL's noise schedule)"}


def markdown(summary: dict, mode_name: str, mode: dict, grid: str, floor: float | None, teacher: dict,
             world: str = "mnist") -> str:
    from ..demo.worlds import get_world

    grids = [get_world(world).student_timesteps(s) if world != "mnist" else grid_for(s, grid)
             for s in mode["student_steps"]]
    samples = mode["eval_per_prompt"] * len(get_world(world).grid_prompts())
    lines = [f"# dmd-benchmark ({mode_name}, {world} world)", "",
             f"Teacher: {WORLD_TEACHERS[world]}; student grids: "
             + ", ".join(f"{s}-step {g}" for s, g in zip(mode["student_steps"], grids))
             + f"; {mode['max_train_steps']} generator updates, {mode['seeds']} seeds, "
               f"{samples} evaluation samples per run. A run's value is the mean of its evaluations in the last "
               f"third of training (steps {late_steps(mode)}); values: mean ± std over seeds "
               f"(min..max for Frechet to the teacher)."
             + (" Set for every run: " + ", ".join(f"`{k} = {v}`" for k, v in mode["overrides"].items()) + "."
                if mode.get("overrides") else ""), ""]
    if floor is not None:
        lines.append(f"Noise floor (Frechet of a second teacher seed, same sample count): {floor:.2f}. "
                     f"Teacher 50 steps CFG: adherence {teacher.get('adherence', float('nan')):.3f}; "
                     f"unguided: {teacher.get('unguided_adherence', float('nan')):.3f}.")
        lines.append("")
    for steps in mode["student_steps"]:
        rows = [r for r in summary["rows"].values() if r["steps"] == steps]
        if not rows:
            continue
        lines += [f"## {steps}-step student", "",
                  "| variant | group | " + " | ".join(label for _, label, _ in TABLE_METRICS) + " | s/update |",
                  "| --- | --- | " + " | ".join("---" for _ in TABLE_METRICS) + " | --- |"]
        for r in rows:
            cells = []
            for key, _, fmt in TABLE_METRICS:
                if key not in r:
                    cells.append("")
                    continue
                mean, std, low, high = r[key]
                cell = f"{fmt.format(mean)} ± {fmt.format(std)}"
                if key == "frechet":
                    cell += f" ({fmt.format(low)}..{fmt.format(high)})"
                cells.append(cell)
            lines.append(f"| {r['name']} | {r['group']} | " + " | ".join(cells) + f" | {r['seconds_per_step']:.2f} |")
        step_keys = [f"step{k}_adherence" for k in range(1, steps)]
        if steps > 1 and all(k in rows[0] for k in step_keys):
            lines += ["", "Per student step (the same late mean): adherence / Frechet after each step.", "",
                      "| variant | " + " | ".join(f"step {k}" for k in range(1, steps + 1)) + " |",
                      "| --- | " + " | ".join("---" for _ in range(steps)) + " |"]
            for r in rows:
                cells = [f"{r[f'step{k}_adherence'][0]:.3f} / {r[f'step{k}_frechet'][0]:.1f}" for k in range(1, steps)]
                cells.append(f"{r['adherence'][0]:.3f} / {r['frechet'][0]:.1f}")
                lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        same = [r for r in rows if r.get("same_input") and "student_frechet" in r["same_input"][0]]
        if same:
            lines += ["", "Same input, per student step (final checkpoint): Frechet to the teacher's CFG samples of "
                      "the student's x0 / the teacher's conditional x0 / the teacher's CFG x0, all on the student's "
                      "own input of that step (a student worse than the teacher there took a bad step; a teacher bad "
                      "there was handed a bad input).", "",
                      "| variant | " + " | ".join(f"step {k}" for k in range(1, steps + 1)) + " |",
                      "| --- | " + " | ".join("---" for _ in range(steps)) + " |"]
            for r in same:
                cells = [" / ".join(f"{e[f'{role}_frechet']:.1f}" for role in SAME_INPUT_ROLES)
                         for e in r["same_input"]]
                lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Gates", "", "| claim | holds | detail |", "| --- | --- | --- |"]
    for gate in summary["gates"]:
        lines.append(f"| {gate['claim']} | {'yes' if gate['passed'] else '**no**'} | {gate['detail']} |")
    lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], output_dir: str, floor: float | None) -> list[str]:
    from ..demo.plots import save_metric_curves

    paths = []
    metrics = [("adherence", "prompt adherence (p of what the prompt asks)"),
               ("frechet", "Frechet distance to teacher CFG samples"),
               ("saturation", "saturated pixel fraction"), ("image_var", "per-image variance"),
               ("image_mean", "per-image mean"), ("top1", "top-1 accuracy")]
    for steps in sorted({r["steps"] for r in results}):
        for group in ("schedule", "regularizer", "normalization", "guidance", "speed options"):
            reference = "coupled-shared" if group == "speed options" else BASELINE
            series: dict = {}
            for data in results:
                if data["steps"] != steps:
                    continue
                if VARIANTS[data["name"]][0] == group or (group != "schedule" and data["name"] == reference):
                    label = data["name"]
                    if data["name"] == BASELINE and group != "schedule":
                        label = f"{BASELINE} (CA + DM, per_term)"
                    series.setdefault(label, []).append(data["history"])
            if len(series) < 2:
                continue
            path = os.path.join(output_dir, f"{steps}step_{group.replace(' ', '_')}.png")
            save_metric_curves(series, metrics, path, title=f"{steps}-step student: {group} ablation",
                               floors={"frechet": floor} if floor else None)
            paths.append(path)
        if steps > 1:
            # one row per metric, one column per student step: where a late step undoes an early one shows
            per_step = []
            for key, label in (("frechet", "Frechet"), ("adherence", "adherence"), ("image_var", "per-image variance")):
                per_step += [(f"step{k}_{key}", f"{label} after step {k}") for k in range(1, steps)]
                per_step.append((key, f"{label} after step {steps} (final)"))
            series = {}
            for data in results:
                if data["steps"] == steps and VARIANTS[data["name"]][0] == "schedule":
                    series.setdefault(data["name"], []).append(data["history"])
            if series:
                path = os.path.join(output_dir, f"{steps}step_per_student_step.png")
                save_metric_curves(series, per_step, path, title=f"{steps}-step student: output after each step",
                                   columns=steps)
                paths.append(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmd-benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 10-minute subset (4-step schedules only)")
    parser.add_argument("--output_dir", default="output/dmd-benchmark")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--grid", default="sdxl", choices=("sdxl", "shift3", "uniform"),
                        help="student grid: SDXL's SNRs (default), Z-Image's shift 3, or uniform")
    parser.add_argument("--seeds", type=int, help="override the mode's seed count")
    parser.add_argument("--max_train_steps", type=int, help="override the mode's generator updates")
    parser.add_argument("--eval_every", type=int, help="override the mode's evaluation interval")
    parser.add_argument("--eval_per_prompt", type=int, help="override the mode's samples per prompt")
    parser.add_argument("--train_batch_size", type=int, help="override the prompts per generator update")
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer setting for every run (a variant's own settings win), e.g. learning_rate=3e-5; "
                             "repeat for more")
    parser.add_argument("--student_steps", help="comma-separated step counts, e.g. 1,4")
    parser.add_argument("--world", default="mnist", choices=("texture", "mnist"),
                        help="the teacher and data of the quality runs (texture: SD-style, guidance acting at clean "
                             "levels; mnist: flow teacher)")
    parser.add_argument("--skip_ca_share", action="store_true", help="skip the CA-share measurement")
    parser.add_argument("--ca_samples", type=int, default=96, help="teacher samples of the CA-share measurement")
    parser.add_argument("--ca_levels", type=int, default=40, help="re-noise levels of the CA-share measurement")
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--skip_cost", action="store_true")
    parser.add_argument("--cost_sizes", default="tiny,sdxl-quarter,sdxl",
                        help="cost benchmark models: tiny (demo teacher), sdxl-quarter, sdxl (full size, ~10 GB)")
    parser.add_argument("--cost_threads", type=int, default=2, help="torch threads of each cost measurement")
    parser.add_argument("--cost_rank", type=int,
                        help="LoRA rank of the SDXL-architecture cost cases (default 64, DMD2's)")
    parser.add_argument("--cost_optimizer", choices=OPTIMIZERS, help="optimiser of the cost cases (default adamw)")
    parser.add_argument("--reuse_cost", action="store_true", help="report the cost.json already in output_dir")
    parser.add_argument("--skip_speed", action="store_true",
                        help="skip the side-by-side seconds per update of the waste cuts (tiny SD1.5 / SDXL, demo)")
    parser.add_argument("--finetune", action="store_true",
                        help="also run the fine-tune benchmark (finetune.py): a vega-style fine-tune of the texture "
                             "teacher distilled from scratch and from the base's student LoRA, against that LoRA "
                             "applied untrained; 9 LoRA runs, 66 min on 2 cores)")
    parser.add_argument("--finetune_mode", default="full", choices=("full", "tiny"),
                        help="tiny: a seconds-long run of every code path (tests)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a gate fails")
    return parser


def _mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The quick or full mode with the command line's overrides."""
    mode = dict(MODES["quick" if args.quick else "full"])
    for key in ("seeds", "max_train_steps", "eval_every", "eval_per_prompt", "train_batch_size"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        mode["variants"] = tuple(names)
    if args.student_steps:
        mode["student_steps"] = tuple(int(s) for s in args.student_steps.split(","))
    if args.set:
        from ..trainer.config import KEYS

        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            if key.strip() not in KEYS or not value.strip():
                parser.error(f"--set {item!r}: give KEY=VALUE with a trainer setting as KEY (e.g. learning_rate=3e-5)")
            try:
                overrides[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key.strip()] = value.strip()
        mode["overrides"] = overrides
    return mode


def _quality_section(args: argparse.Namespace, mode: dict, mode_name: str) -> tuple[list[str], bool]:
    """Train every planned run, evaluate, write quality.json and the plots; (report lines, a gate failed)."""
    from ..demo.metrics import Evaluator
    from ..demo.worlds import get_world

    world = get_world(args.world)
    jobs = plan_jobs(mode, args.output_dir, args.grid, world.name)
    logger.info("%d training runs, %d at a time", len(jobs), args.jobs)
    results = run_jobs(jobs, args.jobs)
    floor = Evaluator(world=world).noise_floor(len(world.evaluation_prompts(mode["eval_per_prompt"])))
    reference = world.teacher_info().get("reference", {})
    guidance = world.teacher_info().get("guidance_scale", 3.0)
    teacher = {"adherence": reference.get(f"cfg_{guidance:g}", {}).get("adherence", math.nan),
               "unguided_adherence": reference.get("cfg_1", {}).get("adherence", math.nan)}
    summary = summarize(results, floor)
    _write_json(os.path.join(args.output_dir, "quality.json"),
                {"mode": mode, "grid": args.grid, "world": world.name, "summary": summary, "noise_floor": floor})
    plots = plot(results, args.output_dir, floor)
    report = [markdown(summary, mode_name, mode, args.grid, floor, teacher, world.name),
              "Plots: " + ", ".join(os.path.basename(p) for p in plots), ""]
    return report, not all(g["passed"] for g in summary["gates"])


def _ca_share_section(args: argparse.Namespace) -> str:
    """Before any training: where each world's CFG effect lives, relative to the student's input levels."""
    from ..demo.worlds import get_world
    from ..trainer.adapters.diffusers import DiffusersAdapter
    from .ca_share import ca_share, ca_share_markdown, plot_ca_profiles

    results = {}
    for name in dict.fromkeys([args.world, "texture", "mnist"]):
        world = get_world(name)
        if not os.path.isdir(world.teacher_dir):
            continue
        adapter = DiffusersAdapter.from_pretrained(world.teacher_dir)
        guidance = world.teacher_info().get("guidance_scale", 3.0)
        logger.info("CA share of the %s teacher (%d samples, %d levels)", name, args.ca_samples, args.ca_levels)
        prompts = world.evaluation_prompts(max(1, args.ca_samples // len(world.grid_prompts())))
        results[name] = ca_share(adapter, prompts, guidance, world.student_timesteps(4), levels=args.ca_levels)
    _write_json(os.path.join(args.output_dir, "ca_share.json"), results)
    plot_ca_profiles(results, os.path.join(args.output_dir, "ca_share.png"))
    text = ca_share_markdown(results) + "\nPlot: ca_share.png\n"
    print(text, flush=True)  # before the long part: it is the first thing worth reading
    return text


def _cost_section(args: argparse.Namespace) -> str:
    """Peak memory and time per update of the cost cases (or the cost.json already there, with --reuse_cost)."""
    from .cost import cost_markdown, run_cost_benchmark

    cost_file = os.path.join(args.output_dir, "cost.json")
    if args.reuse_cost and os.path.isfile(cost_file):
        with open(cost_file, encoding="utf-8") as handle:
            return cost_markdown(json.load(handle))
    sizes = [s.strip() for s in args.cost_sizes.split(",") if s.strip()]
    cost = run_cost_benchmark(sizes, os.path.join(args.output_dir, "cost"), threads=args.cost_threads,
                              rank=args.cost_rank, optimizer=args.cost_optimizer)
    _write_json(cost_file, cost)
    return cost_markdown(cost)


def _speed_section(args: argparse.Namespace) -> str:
    """Seconds per update of the waste cuts, side by side."""
    from .cost import run_speed_benchmark, speed_markdown

    speed = run_speed_benchmark(threads=args.cost_threads)
    _write_json(os.path.join(args.output_dir, "speed.json"), speed)
    return speed_markdown(speed)


def _finetune_gates_pass(output_dir: str) -> bool:
    from .finetune import read_summary

    return all(g["passed"] for g in read_summary(output_dir)["summary"]["gates"])


def benchmark_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    mode_name = "quick" if args.quick else "full"
    mode = _mode(parser, args)
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.time()
    report, failed = [f"# dmd-benchmark ({mode_name})", ""], False
    ca_text = "" if args.skip_ca_share else _ca_share_section(args)
    if not args.skip_quality:
        report, failed = _quality_section(args, mode, mode_name)
    if ca_text:
        report.insert(2, ca_text)
    if args.finetune:
        from .finetune import MODES as FINETUNE_MODES
        from .finetune import run_finetune_benchmark

        finetune_mode = dict(FINETUNE_MODES[args.finetune_mode])
        if args.seeds is not None:
            finetune_mode["seeds"] = args.seeds
        section = run_finetune_benchmark(args.output_dir, finetune_mode, args.jobs, mode.get("overrides"),
                                         threads=args.cost_threads)
        report.append(section)
        failed = failed or args.finetune_mode == "full" and not _finetune_gates_pass(args.output_dir)
    if not args.skip_cost:
        report.append(_cost_section(args))
    if not args.skip_speed:
        report.append(_speed_section(args))
    report.append(f"Total time: {time.time() - started:.0f} s.")
    _write_text(os.path.join(args.output_dir, "benchmark.md"), "\n".join(report) + "\n")
    print("\n".join(report))
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(benchmark_main())
