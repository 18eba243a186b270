"""`dmd-benchmark --finetune`: does distilling a creator's own fine-tune beat stacking a speed LoRA that was
distilled from the base model, and how much does starting from that LoRA save?

On the texture world: the base teacher is the shipped one; the "fine-tune" is that teacher trained further on
the `vega` style (texture.STYLES: a sepia grade of the backgrounds and crisper texture marks), as a creator
fine-tunes SDXL on their own images. Every student is a LoRA (the product's path), at 4 steps:

- (i) today's practice: the base's distilled student LoRA applied to the fine-tune, no training;
- (ii) the fine-tune distilled from scratch;
- (iii) the fine-tune distilled from (i)'s LoRA (`network_weights`), so (i) is (iii) at step 0.

All are scored against the fine-tune's own CFG samples (Frechet on classifier features, attribute adherence)
and its style (`tint_ratio`: how much of vega's colour cast the backgrounds have; `hf_energy_ratio`: the
texture marks' fine energy against vega's real data), over iterations, several seeds. The teacher at the
student's cost (4 steps with CFG: 8 network calls) is the other option creators have and is scored too.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from .runs import _is_late, late_mean

logger = logging.getLogger("decoupled_dmd.finetune")

STYLE = "vega"
STUDENT_STEPS = 4
# LoRA students (student and fake model are adapters on one frozen base, as the product trains SDXL). Chosen
# with a probe on the base world (docs/demo.md): LoRA updates move less than full copies, so the rates are 10x
# the full-copy benchmark's 3e-5 / 3e-4. DMD's regression loss (the demo's recipe) holds each noise's background
# grey in place, which the DM term alone leaves swinging: with it every arm lands lower and the warm start loses
# its early bump (docs/demo.md, the fine-tune section's two tables).
SETTINGS = dict(training_mode="lora", network_dim=16, network_alpha=16.0, learning_rate=3e-4,
                fake_learning_rate=3e-3, regression_loss_weight=1.0)
MODES = {
    "full": dict(seeds=3, base_steps=120, scratch_steps=120, warm_steps=60, eval_every=20, warm_eval_every=5,
                 eval_per_prompt=16, finetune_steps=500, reference_per_prompt=32, reference_steps=50),
    # the test's: seconds, and every code path
    "tiny": dict(seeds=1, base_steps=2, scratch_steps=2, warm_steps=2, eval_every=1, warm_eval_every=1,
                 eval_per_prompt=1, finetune_steps=2, reference_per_prompt=2, reference_steps=4, train_batch_size=2,
                 regression_pairs=2, regression_teacher_steps=2),
}
ARMS = {
    "base": "base student (base teacher, from scratch)",
    "transplanted": "(i) base student LoRA on the fine-tune (no training)",
    "scratch": "(ii) fine-tune distilled from scratch",
    "warm": "(iii) fine-tune distilled from (i)'s LoRA",
}
TABLE = (("frechet", "Frechet to fine-tune CFG", "{:.0f}"), ("adherence", "adherence", "{:.3f}"),
         ("tint_ratio", "vega colour cast", "{:.2f}"), ("hf_energy_ratio", "fine energy / vega real", "{:.2f}"),
         ("accuracy_texture", "texture acc.", "{:.3f}"), ("frechet_real", "Frechet to vega real", "{:.0f}"))


def prepare_teacher(output_dir: str, mode: dict, threads: int = 2) -> dict:
    """The fine-tuned teacher and its reference statistics under `output_dir/finetune` (built once, then reused);
    returns the world spec of the fine-tune (`worlds.get_world` rebuilds it in a worker)."""
    import torch

    from ..demo.metrics import build_reference
    from ..demo.models import TEXTURE_TEACHER_DIR, teacher_info
    from ..demo.worlds import TextureWorld
    from .training import finetune_texture_teacher

    folder = os.path.join(output_dir, "finetune", f"teacher_{STYLE}")
    reference = os.path.join(output_dir, "finetune", f"reference_{STYLE}.safetensors")
    world = TextureWorld(STYLE, folder, reference)
    index = os.path.join(folder, "model_index.json")
    guidance = teacher_info(TEXTURE_TEACHER_DIR).get("guidance_scale", 3.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not (os.path.isfile(index) and teacher_info(folder).get("train_steps") == mode["finetune_steps"]):
            logger.info("fine-tuning the texture teacher on the %s style (%d steps)", STYLE, mode["finetune_steps"])
            os.makedirs(folder, exist_ok=True)
            finetune_texture_teacher(folder, TEXTURE_TEACHER_DIR, STYLE, steps=mode["finetune_steps"],
                                     extra_info={"guidance_scale": guidance, "world": "texture"})
            if os.path.isfile(reference):
                os.remove(reference)
        if not os.path.isfile(reference):
            logger.info("reference statistics of the fine-tune's CFG samples")
            build_reference(folder, guidance_scale=guidance, output=reference, world=world,
                            per_prompt=mode["reference_per_prompt"], steps=mode["reference_steps"])
    finally:
        torch.set_num_threads(previous)
    return world.spec()


def _job(arm: str, seed: int, steps: int, eval_every: int, world, output_dir: str, mode: dict,
         overrides: dict, network_weights: str = "") -> dict:
    from ..demo.worlds import get_world

    settings = dict(SETTINGS, **overrides, seed=seed, max_train_steps=steps,
                    student_timesteps=get_world(world).student_timesteps(STUDENT_STEPS))
    for key in ("train_batch_size", "regression_pairs", "regression_teacher_steps"):  # the tiny mode's
        if mode.get(key):
            settings[key] = mode[key]
    if network_weights:
        settings["network_weights"] = network_weights
    return {"name": arm, "steps": STUDENT_STEPS, "seed": seed, "world": world, "settings": settings,
            "folder": os.path.join(output_dir, "finetune", "runs", arm, f"seed{seed}"),
            "eval_every": eval_every, "eval_per_prompt": mode["eval_per_prompt"]}


def plan_first(output_dir: str, mode: dict, finetune_world: dict, overrides: dict | None = None) -> list[dict]:
    """The runs that need nothing else: the base students and the fine-tune distilled from scratch."""
    jobs = []
    for seed in range(mode["seeds"]):
        jobs.append(_job("base", seed, mode["base_steps"], mode["eval_every"], "texture", output_dir, mode,
                         overrides or {}))
        jobs.append(_job("scratch", seed, mode["scratch_steps"], mode["eval_every"], finetune_world, output_dir,
                         mode, overrides or {}))
    return jobs


def plan_warm(output_dir: str, mode: dict, finetune_world: dict, base_results: list[dict],
              overrides: dict | None = None) -> list[dict]:
    """(iii): the fine-tune distilled from each base student's LoRA (same seed); its step 0 is (i)."""
    return [_job("warm", r["seed"], mode["warm_steps"], mode["warm_eval_every"], finetune_world, output_dir, mode,
                 overrides or {}, network_weights=r["student_file"]) for r in base_results]


def teacher_at_student_cost(finetune_world: dict, per_prompt: int, seed: int = 4242) -> dict:
    """The fine-tune itself at the student's cost: 4 Euler steps with CFG (8 network calls), and 8 steps (16)."""
    from ..demo.metrics import Evaluator, teacher_samples
    from ..demo.models import teacher_info
    from ..demo.worlds import get_world
    from ..trainer.adapters.diffusers import DiffusersAdapter

    world = get_world(finetune_world)
    adapter = DiffusersAdapter.from_pretrained(world.teacher_dir)
    guidance = teacher_info(world.teacher_dir).get("guidance_scale", 3.0)
    evaluator, prompts = Evaluator(world=world), world.evaluation_prompts(per_prompt)
    return {f"teacher {steps} steps CFG ({2 * steps} calls)": evaluator(
        teacher_samples(adapter, prompts, seed, guidance, steps=steps), prompts) for steps in (4, 8)}


def _mean_std(finals: list[dict], keys) -> dict:
    """{key: (mean, std)} over the seeds' values (nan where a seed lacks the key)."""
    return {k: (float(np.mean([f.get(k, math.nan) for f in finals])),
                float(np.std([f.get(k, math.nan) for f in finals])))
            for k in keys}


def summarize(results: list[dict], teacher_rows: dict) -> dict:
    """Per arm: the seeds' late means (mean, std); (i) from (iii)'s step 0; (iii)'s curve against (ii)'s end."""
    by_arm: dict = {}
    for data in results:
        by_arm.setdefault(data["name"], []).append(data)
    values: dict = {}
    for arm, runs in by_arm.items():
        values[arm] = [late_mean(r["history"]) for r in runs]
    if "warm" in by_arm:
        values["transplanted"] = [r["history"][0] for r in by_arm["warm"]]
    rows = {}
    for arm in ARMS:
        if arm not in values:
            continue
        finals = values[arm]
        keys = [k for k in finals[0] if isinstance(finals[0][k], (int, float)) and k != "step"]
        rows[arm] = _mean_std(finals, keys)
        rows[arm]["seeds"] = len(finals)
        rows[arm]["per_seed_frechet"] = [f.get("frechet") for f in finals]
    summary = {"rows": rows, "teacher": teacher_rows, "curves": {}}
    for arm in ("scratch", "warm"):
        if arm in by_arm:
            steps = sorted({h["step"] for r in by_arm[arm] for h in r["history"]})
            summary["curves"][arm] = [
                {"step": s, **{k: float(np.mean([h[k] for r in by_arm[arm] for h in r["history"]
                                                 if h["step"] == s and k in h]))
                               for k in ("frechet", "adherence", "tint_ratio", "hf_energy_ratio")
                               if any(k in h for r in by_arm[arm] for h in r["history"])}}
                for s in steps]
    if "scratch" in by_arm and "warm" in by_arm:
        summary.update(like_with_like(by_arm))
    summary["gates"] = gates(summary)
    return summary


def window_mean(history: list[dict], budget: float, key: str = "frechet") -> float:
    """A run's late mean at a budget of `budget` updates: the mean of `key` over its evaluations in the last
    third of [0, budget] (steps > 0), the same window `late_mean` takes at a run's end."""
    picked = [h[key] for h in history if 0 < h["step"] <= budget + 1e-9 and _is_late(h["step"], budget) and key in h]
    return float(np.mean(picked)) if picked else math.nan


def like_with_like(by_arm: dict[str, list[dict]]) -> dict:
    """(iii) against (ii) as like with like: late means (the same window) at matched update budgets, paired by
    seed; and (iii)'s late mean at a quarter of (ii)'s budget against (ii)'s late mean at its end (the goal).
    A first crossing of a noisy curve against a late mean, as before, favoured (iii)."""
    from ..demo.stats import paired_seed_test

    scratch = {r["seed"]: r for r in by_arm["scratch"]}
    warm = {r["seed"]: r for r in by_arm["warm"]}
    seeds = sorted(set(scratch) & set(warm))
    scratch_steps = max(h["step"] for r in scratch.values() for h in r["history"])
    warm_steps = max(h["step"] for r in warm.values() for h in r["history"])

    def compared(warm_budget: float, scratch_budget: float) -> dict:
        mine = [window_mean(warm[s]["history"], warm_budget) for s in seeds]
        theirs = [window_mean(scratch[s]["history"], scratch_budget) for s in seeds]
        out = {"warm_budget": warm_budget, "scratch_budget": scratch_budget, "warm": float(np.mean(mine)),
               "scratch": float(np.mean(theirs)), "per_seed_difference": [m - t for m, t in zip(mine, theirs)]}
        if len(seeds) >= 2 and all(map(math.isfinite, mine + theirs)):
            out["test"] = paired_seed_test(mine, theirs)
        return out

    budgets = sorted({h["step"] for r in scratch.values() for h in r["history"] if 0 < h["step"] <= warm_steps})
    return {"matched_budgets": [compared(b, b) for b in budgets],
            "warm_at_a_quarter": compared(scratch_steps / 4, scratch_steps), "scratch_steps": scratch_steps}


def gates(summary: dict) -> list[dict]:
    """The issue's goals: (ii) and (iii) beat (i) on the fine-tune's style; (iii) reaches (ii)'s final quality
    in at most a quarter of (ii)'s iterations."""
    rows, out = summary["rows"], []
    if "transplanted" in rows:
        for arm in ("scratch", "warm"):
            if arm not in rows:
                continue
            mine, theirs = rows[arm]["frechet"][0], rows["transplanted"]["frechet"][0]
            style_mine = abs(1 - rows[arm].get("tint_ratio", (math.nan,))[0])
            style_theirs = abs(1 - rows["transplanted"].get("tint_ratio", (math.nan,))[0])
            out.append({"claim": f"{ARMS[arm]} beats (i) on the fine-tune (lower Frechet to its CFG samples, colour "
                                 f"cast at least as close to vega's)",
                        "passed": bool(mine < theirs and style_mine <= style_theirs + 0.02),
                        "detail": f"Frechet {mine:.0f} vs {theirs:.0f}; |1 - cast| {style_mine:.2f} vs "
                                  f"{style_theirs:.2f}"})
    quarter = summary.get("warm_at_a_quarter")
    if quarter:
        test = quarter.get("test")
        out.append({"claim": "(iii)'s late mean at a quarter of (ii)'s updates is at least as close to the fine-tune "
                             "as (ii)'s late mean at its end",
                    "passed": bool(quarter["warm"] <= quarter["scratch"]),
                    "detail": f"(iii) {quarter['warm']:.1f} at {quarter['warm_budget']:g} updates, (ii) "
                              f"{quarter['scratch']:.1f} at {quarter['scratch_budget']:g}"
                              + ("" if test is None else
                                 f"; difference {test['mean_difference']:+.1f} [{test['interval'][0]:+.1f}, "
                                 f"{test['interval'][1]:+.1f}], p = {test['p_value']:.2f} over {test['n_seeds']} "
                                 "seeds (paired t)")})
    return out


def markdown(summary: dict, mode: dict, floor: float | None, overrides: dict | None = None) -> str:
    lines = ["## Distil your own fine-tune (texture world, `vega` style)", "",
             f"Base teacher: the shipped texture teacher. Fine-tune: it trained {mode['finetune_steps']} more steps "
             f"on the vega style (sepia backgrounds, crisper texture marks). LoRA students "
             f"(`{dict(SETTINGS, **(overrides or {}))}`), "
             f"{STUDENT_STEPS} steps, {mode['seeds']} seeds; base and (ii) {mode['scratch_steps']} updates, (iii) "
             f"{mode['warm_steps']}. A value is the mean of a run's evaluations in its last third, then mean ± std "
             f"over seeds; (i) is (iii) before its first update. Everything is scored against the fine-tune: its "
             f"50-step CFG samples (Frechet; noise floor {floor if floor is None else round(floor)}), vega's real "
             f"images (colour cast 1 = vega's, 0 = the base's greys; fine energy)." , "",
             "| student | " + " | ".join(label for _, label, _ in TABLE) + " |",
             "| --- | " + " | ".join("---" for _ in TABLE) + " |"]
    for arm, label in ARMS.items():
        row = summary["rows"].get(arm)
        if not row or arm == "base":
            continue
        cells = [f"{fmt.format(row[k][0])} ± {fmt.format(row[k][1])}" if k in row else "" for k, _, fmt in TABLE]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, metrics in summary.get("teacher", {}).items():
        cells = [fmt.format(metrics[k]) if k in metrics else "" for k, _, fmt in TABLE]
        lines.append(f"| fine-tune, {name} | " + " | ".join(cells) + " |")
    curve = summary["curves"].get("warm", [])
    if curve:
        lines += ["", "(iii) over its first updates (seed mean): "
                  + ", ".join(f"{c['step']}: {c['frechet']:.0f}" for c in curve[:: max(1, len(curve) // 8)])]
    matched = summary.get("matched_budgets", [])
    if matched:
        lines += ["", "(iii) against (ii) at matched update budgets (late means, the same window; paired by seed):", "",
                  "| updates | (ii) from scratch | (iii) warm start | (iii) - (ii) [95% CI], p |",
                  "| --- | --- | --- | --- |"]
        for row in matched:
            test = row.get("test")
            lines.append(f"| {row['warm_budget']:g} | {row['scratch']:.1f} | {row['warm']:.1f} | "
                         + ("" if test is None else f"{test['mean_difference']:+.1f} [{test['interval'][0]:+.1f}, "
                            f"{test['interval'][1]:+.1f}], p = {test['p_value']:.2f}") + " |")
        lines.append("")
        lines.append(f"With {len(matched[0]['per_seed_difference'])} seeds a paired t-test separates only differences "
                     "several times the seeds' spread; a tie here is not evidence of equality.")
    lines += ["", "| goal | holds | detail |", "| --- | --- | --- |"]
    for gate in summary["gates"]:
        lines.append(f"| {gate['claim']} | {'yes' if gate['passed'] else '**no**'} | {gate['detail']} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], summary: dict, path: str, floor: float | None) -> str:
    """Frechet to the fine-tune's CFG samples, colour cast and adherence over updates: (ii) and (iii) per seed,
    (i) and the teacher at 8 calls as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("frechet", "Frechet to fine-tune CFG samples"), ("tint_ratio", "vega colour cast (1 = vega)"),
               ("adherence", "prompt adherence"))
    colours = {"scratch": "tab:blue", "warm": "tab:orange"}
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for axis, (key, label) in zip(axes, metrics):
        for data in results:
            if data["name"] not in colours:
                continue
            points = [(h["step"], h[key]) for h in data["history"] if key in h]
            axis.plot(*zip(*points), color=colours[data["name"]], alpha=0.35, linewidth=0.8)
        for arm, curve in summary["curves"].items():  # the seed mean, which the goal is read on
            points = [(c["step"], c[key]) for c in curve if key in c]
            if arm in colours and points:
                axis.plot(*zip(*points), color=colours[arm], linewidth=2.2, label=f"{ARMS[arm]} (seed mean)")
        final = summary["rows"].get("scratch", {}).get(key)
        if final and key == "frechet":
            axis.axhline(final[0], color="tab:blue", linestyle="-.", linewidth=1,
                         label="(ii)'s final quality (mean of its last third)")
        transplanted = summary["rows"].get("transplanted", {}).get(key)
        if transplanted:
            axis.axhline(transplanted[0], color="tab:red", linestyle="--", label=ARMS["transplanted"])
        for name, metrics_ in summary.get("teacher", {}).items():
            if key in metrics_ and "4 steps" in name:
                axis.axhline(metrics_[key], color="gray", linestyle=":", label=f"fine-tune, {name}")
        if key == "frechet":
            if floor:
                axis.axhline(floor, color="black", linewidth=0.8, label="noise floor")
            axis.set_yscale("log")
        axis.set_xlabel("generator updates")
        axis.set_title(label)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_finetune_benchmark(output_dir: str, mode: dict, jobs: int = 2, overrides: dict | None = None,
                           threads: int = 2) -> str:
    """Build the fine-tune, train every arm (resumable: each run's result is a JSON file), write
    finetune.json, finetune.png and return the markdown section."""
    from ..demo.metrics import Evaluator
    from ..demo.worlds import get_world
    from .runs import _write_json, run_jobs

    finetune_world = prepare_teacher(output_dir, mode, threads)
    first = run_jobs(plan_first(output_dir, mode, finetune_world, overrides), jobs)
    base = sorted((r for r in first if r["name"] == "base"), key=lambda r: r["seed"])
    warm = run_jobs(plan_warm(output_dir, mode, finetune_world, base, overrides), jobs)
    # the fine-tune's rows are (i)-(iii); the base students were evaluated on their own base world only
    results = [r for r in first if r["name"] == "scratch"] + warm
    world = get_world(finetune_world)
    floor = Evaluator(world=world).noise_floor(len(world.evaluation_prompts(mode["eval_per_prompt"])))
    teacher_rows = teacher_at_student_cost(finetune_world, mode["eval_per_prompt"])
    summary = summarize(results, teacher_rows)
    summary["base_on_base_world"] = _late_rows(base)
    _write_json(os.path.join(output_dir, "finetune.json"), {"mode": mode, "settings": SETTINGS,
                                                            "overrides": overrides or {}, "summary": summary,
                                                            "noise_floor": floor, "world": finetune_world})
    plot(results, summary, os.path.join(output_dir, "finetune.png"), floor)
    text = markdown(summary, mode, floor, overrides)
    base_row = summary["base_on_base_world"]
    if base_row:
        text += (f"\nThe base students on the base world (their own teacher's CFG samples): Frechet "
                 f"{base_row['frechet'][0]:.0f} ± {base_row['frechet'][1]:.0f}, adherence "
                 f"{base_row['adherence'][0]:.3f}.\n")
    return text + "\nPlot: finetune.png\n"


def _late_rows(runs: list[dict]) -> dict:
    if not runs:
        return {}
    finals = [late_mean(r["history"]) for r in runs]
    return _mean_std(finals, [k for k in ("frechet", "adherence") if all(k in f for f in finals)])


def read_summary(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "finetune.json"), encoding="utf-8") as handle:
        return json.load(handle)
