"""Arms over training seeds under the protocol (issue 27): the shipped texture recipe, its controls and its
alternatives, each trained on several training seeds and scored on both splits, then compared paired by seed.

    python -m decoupled_dmd.research.arms run --arms "shipped,regression only,DM only,CA only,EMA 0.97" --seeds 0-4
    python -m decoupled_dmd.research.arms report --split test --teacher_samples /path/solvers_test.pt

A run trains the demo's texture student (`run.WORLD_DEMO_SETTINGS`) with its arm's settings over them, scores
its validation-split samples every `CHECKPOINT_EVERY` updates (the stop is a choice: validation only), then
samples the held-out prompts from each split's noise seed (`per_prompt` each) and stores the instrument's
features and per-sample hits beside its metrics, so a report needs no network call. Runs go `workers` at a
time, one CPU thread each; a finished run is a JSON file, so an interrupted batch continues where it stopped.

The report: per arm, the mean and sample standard deviation over seeds of each figure, a paired t-test
against the baseline arm on the seeds both have (and the seeds a difference of that size needs for 80%
power); with the teacher's solver samples, each seed's Frechet minus the teacher row's on the same bootstrap
draws (paired: same prompts, same noise indices).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from .runs import _write_json, _write_text

logger = logging.getLogger("decoupled_dmd.arms")

# Arm -> settings over the demo's texture recipe. Controls first (what the recipe's result is owed to), then
# the alternatives a default was chosen among, then students of other step counts.
ARMS: dict[str, dict] = {
    "shipped": {},
    "regression only": {"cfg_augmentation": False, "regularizer": "none"},
    "DM only": {"cfg_augmentation": False},
    "CA only": {"regularizer": "none"},
    "no regression": {"regression_loss_weight": 0.0},
    "EMA 0.97": {"student_ema_decay": 0.97},  # the shipped recipe since 2026-12-07 (chosen on these arms)
    "no EMA": {"student_ema_decay": 0.0},  # the recipe these arms were run with as "shipped"
    "coupled-shared": {"renoise_schedule": "coupled-shared"},
    "per_term_cfg": {"update_normalization": "per_term_cfg"},
    "fake lr 1e-4": {"fake_learning_rate": 1e-4},
    "regression 0.25": {"regression_loss_weight": 0.25},
    "1 step": {"student_steps": 1},
    "2 steps": {"student_steps": 2},
    "8 steps": {"student_steps": 8},
}
CHECKPOINT_EVERY = 25
PER_PROMPT = 32  # 16 held-out prompts x 32 = 512 samples per split, the solver table's n
FIGURES = ("frechet", "accuracy_texture", "texture_spectrum_accuracy", "top1", "hf_energy_ratio")


def arm_settings(arm: str, seed: int, max_train_steps: int | None = None) -> dict:
    """The TrainConfig values of `arm` at training seed `seed` (the demo's texture recipe under the arm's)."""
    from ..demo.protocol import check_training_seed
    from ..demo.run import WORLD_DEMO_SETTINGS
    from ..demo.worlds import get_world

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from: {', '.join(ARMS)}")
    overrides = dict(ARMS[arm])
    steps = overrides.pop("student_steps", None)
    values = dict(WORLD_DEMO_SETTINGS["texture"], **overrides, seed=check_training_seed(seed))
    if steps is not None:
        values["student_timesteps"] = get_world("texture").student_timesteps(steps)
    if max_train_steps is not None:
        values["max_train_steps"] = max_train_steps
    return values


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


def plan(arms: list[str], seeds: list[int], output_dir: str, max_train_steps: int | None = None,
         per_prompt: int = PER_PROMPT, memorisation: bool = True) -> list[dict]:
    """One job per arm and seed, seed-major (an interrupted batch has every arm on its first seeds)."""
    jobs = []
    for seed in seeds:
        for arm in arms:
            jobs.append({"arm": arm, "seed": seed, "settings": arm_settings(arm, seed, max_train_steps),
                         "folder": os.path.join(output_dir, arm.replace(" ", "_"), f"seed{seed}"),
                         "per_prompt": per_prompt, "memorisation": memorisation and arm == "shipped"})
    return jobs


def run_arm(job: dict) -> dict:
    """Train one arm at one seed and score it on both splits; stores result.json and samples_<split>.npz."""
    import shutil

    import torch

    from ..demo.experiment import run_distillation, sample_student
    from ..demo.metrics import Evaluator
    from ..demo.protocol import SPLITS
    from ..demo.stats import interval as percentile_interval
    from ..demo.stats import paired_bootstrap_frechet, paired_bootstrap_mean, recentre
    from ..demo.worlds import get_world

    result_file = os.path.join(job["folder"], "result.json")
    wanted = json.loads(json.dumps(job["settings"]))
    if os.path.isfile(result_file):
        with open(result_file, encoding="utf-8") as handle:
            stored = json.load(handle)
        if stored.get("settings") == wanted and stored.get("per_prompt") == job["per_prompt"]:
            return stored
        logger.warning("%s: stored with other settings; training it again", job["folder"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    os.environ.setdefault("TQDM_DISABLE", "1")
    world = get_world("texture")
    prompts = world.evaluation_prompts(job["per_prompt"])
    evaluators = {name: Evaluator(world=world, split=name) for name in SPLITS}
    training_dir = os.path.join(job["folder"], "training")
    shutil.rmtree(training_dir, ignore_errors=True)
    result, trainer = run_distillation(job["arm"], job["settings"], training_dir, eval_every=CHECKPOINT_EVERY,
                                       eval_per_prompt=job["per_prompt"], evaluator=evaluators["validation"],
                                       keep_trainer=True, world=world, track=False)
    data = {"arm": job["arm"], "seed": job["seed"], "settings": wanted, "per_prompt": job["per_prompt"],
            "steps": len(trainer.levels), "train_steps": trainer.step, "seconds": result.seconds,
            "seconds_per_step": result.seconds_per_step,
            "validation_curve": [{k: v for k, v in entry.items() if not k.startswith("step") or k == "step"}
                                 for entry in result.history], "splits": {}}
    for name, split in SPLITS.items():
        images = sample_student(trainer, prompts, split.noise_seed)[-1]
        metrics, per_sample = evaluators[name].score(images, prompts)
        features = per_sample["features"].double().numpy()
        draws = paired_bootstrap_frechet({"student": features}, evaluators[name].reference_features)["student"]
        metrics.update(frechet_interval=percentile_interval(recentre(draws, metrics["frechet"])),
                       accuracy_texture_interval=paired_bootstrap_mean(per_sample["texture"].numpy()), n=len(images))
        if name == "validation":  # the last point of the stop curve, on the same noises as the others
            data["validation_curve"].append({"step": trainer.step, **{k: metrics[k] for k in FIGURES}})
        data["splits"][name] = metrics
        np.savez_compressed(os.path.join(job["folder"], f"samples_{name}.npz"), features=features,
                            texture=per_sample["texture"].numpy(), top1=per_sample["top1"].numpy(),
                            texture_spectrum=per_sample["texture_spectrum"].numpy())
    if job.get("memorisation") and trainer.regression is not None and trainer.regression.pairs is not None:
        data["memorisation"] = memorisation_check(trainer)
    shutil.copyfile(result.student_file, os.path.join(job["folder"], "student.safetensors"))
    shutil.rmtree(training_dir, ignore_errors=True)
    _write_json(result_file, data)
    return data


def memorisation_check(trainer, count: int | None = None) -> dict:
    """Does the student reproduce its regression pairs better than fresh ones? The mean squared error between
    the student's samples (first step, and all its steps) and the teacher's CFG samples of the same noises and
    prompts, on the regression loss's own pairs and on as many fresh noises (the same prompts). A student that
    memorised its pairs is much closer on them than on fresh noises."""
    import torch

    from ..trainer.sampling import cfg_sample, few_step_sample

    prompts, noise, target = trainer.regression.pairs
    count = count or len(prompts)
    prompts, noise, target = prompts[:count], noise[:count], target[:count]
    generator = torch.Generator().manual_seed(trainer.config.seed + 0xF2E5)
    fresh = torch.randn(noise.shape, generator=generator)
    teacher = trainer.denoiser("teacher")
    steps = trainer.config.regression_teacher_steps
    out = {"pairs": count, "teacher_steps": steps}
    with torch.no_grad():
        cond = trainer.conditioning(prompts)
        fresh_target = torch.cat([cfg_sample(teacher, fresh[i:i + 64], trainer.conditioning(prompts[i:i + 64]),
                                             trainer.uncond(len(prompts[i:i + 64])), trainer.guidance_scale, steps)
                                  for i in range(0, count, 64)])
        with trainer.student_in_use():
            student = trainer.denoiser("student")
            for name, x_noise, goal in (("pairs", noise, target), ("fresh", fresh, fresh_target)):
                steps_x0: list = []
                full = few_step_sample(student, x_noise, trainer.levels, cond,
                                       generator=torch.Generator().manual_seed(0),
                                       callback=lambda index, x0, steps_x0=steps_x0: steps_x0.append(x0))
                first = steps_x0[0]
                out[f"first_step_mse_{name}"] = float(((first - goal) ** 2).mean())
                out[f"sample_mse_{name}"] = float(((full - goal) ** 2).mean())
    out["first_step_ratio_fresh_to_pairs"] = out["first_step_mse_fresh"] / max(out["first_step_mse_pairs"], 1e-12)
    return out


def run_arms(jobs: list[dict], workers: int = 2) -> list[dict]:
    from .runs import run_jobs

    return run_jobs(jobs, workers, function=run_arm)


def load_results(output_dir: str) -> dict[str, dict[int, dict]]:
    """{arm: {seed: result}} of every finished run under `output_dir`."""
    out: dict[str, dict[int, dict]] = {}
    for arm_folder in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, arm_folder)
        for seed_folder in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            result_file = os.path.join(path, seed_folder, "result.json")
            if os.path.isfile(result_file):
                with open(result_file, encoding="utf-8") as handle:
                    data = json.load(handle)
                data["folder"] = os.path.join(path, seed_folder)
                out.setdefault(data["arm"], {})[data["seed"]] = data
    return out


def summarise(results: dict[str, dict[int, dict]], split: str, baseline: str = "shipped") -> dict:
    """Per arm: n seeds, mean and sample SD of each figure; against `baseline` on the shared seeds, the paired
    t-test of each figure and the seeds its observed difference would need (80% power, two-sided 5%)."""
    from ..demo.stats import paired_seed_test, seeds_needed

    table = {}
    base = results.get(baseline, {})
    for arm, runs in results.items():
        seeds = sorted(runs)
        row = {"seeds": seeds, "n_seeds": len(seeds), "steps": runs[seeds[0]]["steps"]}
        for figure in FIGURES:
            values = np.array([runs[s]["splits"][split][figure] for s in seeds], dtype=float)
            row[figure] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                           "per_seed": values.tolist()}
        shared = [s for s in seeds if s in base]
        if arm != baseline and len(shared) >= 2:
            row["against_" + baseline] = {}
            for figure in ("frechet", "accuracy_texture"):
                test = paired_seed_test([runs[s]["splits"][split][figure] for s in shared],
                                        [base[s]["splits"][split][figure] for s in shared])
                test["seeds_needed_80pct"] = seeds_needed(test["mean_difference"], test["sd_difference"])
                row["against_" + baseline][figure] = test
        table[arm] = row
    return table


def against_teacher(results: dict[str, dict[int, dict]], split: str, teacher_rows: dict[str, np.ndarray],
                    reference: np.ndarray, resamples: int = 200) -> dict:
    """Each run's Frechet minus each teacher row's on the same bootstrap draws (same prompts and indices: the
    rows share their n and prompt order), with its interval and how often the run is the closer; then over the
    seeds of an arm, the mean difference and a t interval (seed spread; the teacher's one draw is shared)."""
    from ..demo.stats import frechet_from_features, interval, paired_bootstrap_frechet, paired_seed_test, recentre

    out = {}
    for arm, runs in results.items():
        arm_out = {}
        for row_name, teacher in teacher_rows.items():
            per_seed, differences = {}, []
            for seed, run in sorted(runs.items()):
                student = np.load(os.path.join(run["folder"], f"samples_{split}.npz"))["features"]
                draws = paired_bootstrap_frechet({"student": student, "teacher": teacher}, reference, resamples)
                estimate = frechet_from_features(student, reference) - frechet_from_features(teacher, reference)
                difference = recentre(draws["student"] - draws["teacher"], estimate)
                per_seed[seed] = {"difference": estimate, "interval": interval(difference),
                                  "student_closer": float((difference < 0).mean())}
                differences.append(estimate)
            summary = {"per_seed": per_seed, "mean_difference": float(np.mean(differences))}
            if len(differences) >= 2:
                test = paired_seed_test(differences, [0.0] * len(differences))
                summary.update(interval=test["interval"], p_value=test["p_value"], test="one-sample t over seeds")
            arm_out[row_name] = summary
        out[arm] = arm_out
    return out


def teacher_features(samples_file: str, rows: list[str], split: str,
                     per_prompt: int = PER_PROMPT) -> tuple[dict[str, tuple[np.ndarray, dict]], np.ndarray]:
    """The instrument's features and metrics of cached teacher rows (`evidence solvers --samples_dir`), and the
    split's reference features."""
    import torch

    from ..demo.metrics import Evaluator
    from ..demo.worlds import get_world

    world = get_world("texture")
    cached = torch.load(samples_file)
    evaluator = Evaluator(world=world, split=split)
    prompts = world.evaluation_prompts(per_prompt)
    out = {}
    for name in rows:
        if name not in cached:
            raise ValueError(f"{samples_file} has no row {name!r}; it has: {', '.join(cached)}")
        metrics, per_sample = evaluator.score(cached[name], prompts)
        out[name] = (per_sample["features"].double().numpy(), metrics)
    return out, evaluator.reference_features


def stop_curves(results: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """Per arm and checkpoint (validation only: the stop is a choice), the mean and sample SD over seeds of the
    Frechet distance and texture accuracy of the validation samples."""
    out = {}
    for arm, runs in results.items():
        by_step: dict[int, dict[str, list]] = {}
        for run in runs.values():
            for point in run.get("validation_curve", []):
                entry = by_step.setdefault(point["step"], {"frechet": [], "accuracy_texture": []})
                for key in entry:
                    entry[key].append(point[key])
        out[arm] = {step: {key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v))
                           for key, v in values.items()} for step, values in sorted(by_step.items())}
    return out


def curves_markdown(curves: dict[str, dict[int, dict]]) -> str:
    lines = ["## Validation over training (mean +- sample SD over seeds; the stop is chosen here)", "",
             "| arm | " + " | ".join(f"update {s}" for s in sorted({s for c in curves.values() for s in c})) + " |"]
    steps = sorted({s for c in curves.values() for s in c})
    lines.append("|---|" + "---|" * len(steps))
    for arm, curve in curves.items():
        cells = []
        for step in steps:
            if step not in curve:
                cells.append("")
                continue
            (f, f_sd, n), (t, _, _) = curve[step]["frechet"], curve[step]["accuracy_texture"]
            cells.append(f"{f:.2f}" + ("" if f_sd is None else f" +- {f_sd:.2f}") + f", tex {t:.3f} (n {n})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(table: dict, split: str, baseline: str, teacher: dict | None = None,
             teacher_metrics: dict | None = None) -> str:
    lines = [f"## Arms on the {split} split ({PER_PROMPT * 16} samples a run; mean +- sample SD over seeds)", "",
             "| arm | steps | seeds | Frechet | texture acc. | spectrum acc. | fine energy | "
             f"Frechet - {baseline} [95% CI], p | texture - {baseline} [95% CI], p | seeds for 80% power |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in table.items():
        def cell(figure, fmt, row=row):
            value = row[figure]
            return fmt.format(value["mean"]) + ("" if value["sd"] is None else " +- " + fmt.format(value["sd"]))
        versus = row.get("against_" + baseline, {})
        tests = []
        for figure, fmt in (("frechet", "{:+.2f}"), ("accuracy_texture", "{:+.3f}")):
            test = versus.get(figure)
            tests.append("" if test is None else f"{fmt.format(test['mean_difference'])} "
                         f"[{fmt.format(test['interval'][0])}, {fmt.format(test['interval'][1])}], "
                         f"p = {test['p_value']:.3f}")
        needed = versus.get("frechet", {}).get("seeds_needed_80pct")
        lines.append(f"| {arm} | {row['steps']} | {row['n_seeds']} | {cell('frechet', '{:.2f}')} | "
                     f"{cell('accuracy_texture', '{:.3f}')} | {cell('texture_spectrum_accuracy', '{:.3f}')} | "
                     f"{cell('hf_energy_ratio', '{:.2f}')} | {tests[0]} | {tests[1]} | "
                     f"{'' if needed is None else (needed if needed < 10**6 else 'inf')} |")
    if teacher:
        lines += ["", "### Against the teacher's rows (Frechet difference, paired bootstrap per seed; t over seeds)",
                  ""]
        if teacher_metrics:
            for name, metrics in teacher_metrics.items():
                lines.append(f"- {name}: Frechet {metrics['frechet']:.2f}, texture accuracy "
                             f"{metrics['accuracy_texture']:.3f}")
            lines.append("")
        lines += ["| arm | teacher row | mean difference [95% CI over seeds], p | per seed: difference (student closer "
                  "in % of resamples) |", "|---|---|---|---|"]
        for arm, rows in teacher.items():
            for name, summary in rows.items():
                ci = summary.get("interval")
                over = (f"{summary['mean_difference']:+.2f}" + ("" if ci is None else
                        f" [{ci[0]:+.2f}, {ci[1]:+.2f}], p = {summary['p_value']:.3f}"))
                seeds = "; ".join(f"{s}: {v['difference']:+.2f} ({v['student_closer']:.0%})"
                                  for s, v in summary["per_seed"].items())
                lines.append(f"| {arm} | {name} | {over} | {seeds} |")
    return "\n".join(lines) + "\n"


STEP_ARMS = ("1 step", "2 steps", "shipped", "8 steps")  # the shipped student has 4 steps


def quality_rows(table: dict, solver_rows: dict[str, dict], arms=STEP_ARMS) -> dict[str, dict]:
    """The teacher's solver rows (`evidence solvers` JSON) and one student line over the step-count arms (mean
    and sample SD over seeds, one network call a step), for plots.save_quality_against_calls."""
    rows = {name: row for name, row in solver_rows.items() if row.get("calls")}
    for arm in arms:
        if arm not in table:
            continue
        row = table[arm]
        point = {"calls": row["steps"], "line": f"student (mean +- SD over {row['n_seeds']} training seeds)"}
        for figure in FIGURES:
            point[figure] = row[figure]["mean"]
            if row[figure]["sd"] is not None:
                point[f"{figure}_sd"] = row[figure]["sd"]
        rows[f"student {row['steps']} steps ({row['steps']} calls)"] = point
    return rows


def arms_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decoupled_dmd.research.arms", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score arms x seeds (finished runs are kept)")
    run.add_argument("--arms", default="shipped", help=f"comma-separated, from: {', '.join(ARMS)}")
    run.add_argument("--seeds", default="0-4", help="training seeds, e.g. 0-4 or 0,3,7 (0..9999)")
    run.add_argument("--workers", type=int, default=2, help="runs at a time, one CPU thread each")
    run.add_argument("--max_train_steps", type=int, default=None, help="override the recipe's updates")
    run.add_argument("--per_prompt", type=int, default=PER_PROMPT, help="samples per held-out prompt per split")
    report = sub.add_parser("report", help="the arms' table (markdown and JSON) for one split")
    report.add_argument("--split", default="validation", choices=("validation", "test"))
    report.add_argument("--baseline", default="shipped")
    report.add_argument("--teacher_samples", default=None,
                        help="solvers_<split>.pt of `evidence solvers --samples_dir`: compare each run with its rows")
    report.add_argument("--teacher_rows", default="dpmpp_2m 4 steps (8 calls),dpmpp_2m 8 steps (16 calls)")
    report.add_argument("--solvers_json", default=None,
                        help="solvers_<split>.json of `evidence solvers`: plot quality against calls with the students")
    report.add_argument("--plot_arms", default=",".join(STEP_ARMS), help="the student line's arms, by step count")
    for p in (run, report):
        p.add_argument("--output_dir", default="output/arms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "run":
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arm(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(ARMS)}")
        jobs = plan(arms, parse_seeds(args.seeds), args.output_dir, args.max_train_steps, args.per_prompt)
        for data in run_arms(jobs, args.workers):
            metrics = data["splits"]["validation"]
            print(f"{data['arm']:16s} seed {data['seed']}: validation Frechet {metrics['frechet']:.2f}, "
                  f"texture {metrics['accuracy_texture']:.3f}", flush=True)
        return 0
    results = load_results(args.output_dir)
    if not results:
        parser.error(f"no finished runs under {args.output_dir}: run `arms run` first")
    table = summarise(results, args.split, args.baseline)
    teacher = teacher_metrics = None
    if args.teacher_samples:
        rows = [r.strip() for r in args.teacher_rows.split(",") if r.strip()]
        features, reference = teacher_features(args.teacher_samples, rows, args.split)
        teacher_metrics = {name: metrics for name, (_, metrics) in features.items()}
        teacher = against_teacher(results, args.split, {n: f for n, (f, _) in features.items()}, reference)
    text = markdown(table, args.split, args.baseline, teacher, teacher_metrics)
    if args.split == "validation":
        text += "\n" + curves_markdown(stop_curves(results))
    _write_text(os.path.join(args.output_dir, f"report_{args.split}.md"), text)
    _write_json(os.path.join(args.output_dir, f"report_{args.split}.json"),
                {"split": args.split, "table": table, "against_teacher": teacher})
    if args.solvers_json:
        from ..demo.plots import save_quality_against_calls

        with open(args.solvers_json, encoding="utf-8") as handle:
            solvers = json.load(handle)
        keep = ("dpmpp_2m", "ddim", "euler", "unipc")
        rows = quality_rows(table, {k: v for k, v in solvers["rows"].items() if k.split(" ")[0] in keep},
                            [a.strip() for a in args.plot_arms.split(",")])
        path = save_quality_against_calls(rows, os.path.join(args.output_dir, f"quality_vs_calls_{args.split}.png"),
                                          solvers.get("noise_floor"))
        print(f"plot: {path}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(arms_main())
