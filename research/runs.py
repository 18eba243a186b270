"""Training runs of the benchmarks, one CPU thread each in worker processes, each stored as a JSON file (an
interrupted benchmark continues where it stopped); a run's score over its late evaluations."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from ..trainer.outputs import atomic_write

logger = logging.getLogger("decoupled_dmd.benchmark")


def run_job(job: dict) -> dict:
    """One training run (in a worker process: one CPU thread); returns and stores its RunResult as JSON."""
    import shutil

    import torch

    from ..demo.experiment import run_distillation

    result_file = os.path.join(job["folder"], "result.json")
    if os.path.isfile(result_file):
        with open(result_file, encoding="utf-8") as handle:
            stored = json.load(handle)
        wanted = json.loads(json.dumps(job["settings"]))
        if all(stored.get("settings", {}).get(key, "absent") == value for key, value in wanted.items()):
            return stored
        # the benchmark's settings changed since this run was stored: its result would answer another question
        logger.warning("%s: stored with other settings; training it again", job["folder"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    os.environ.setdefault("TQDM_DISABLE", "1")
    training_dir = os.path.join(job["folder"], "training")
    shutil.rmtree(training_dir, ignore_errors=True)
    result = run_distillation(job["name"], job["settings"], training_dir, eval_every=job["eval_every"],
                              eval_per_prompt=job["eval_per_prompt"], world=job.get("world", "mnist"))
    data = {**result.to_dict(), "steps": job["steps"], "seed": job["seed"]}
    for name in os.listdir(training_dir):  # keep the logs and the student; drop the resumable states
        if name.startswith("state-"):
            shutil.rmtree(os.path.join(training_dir, name), ignore_errors=True)
    with open(result_file + ".partial", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(result_file + ".partial", result_file)
    return data


def run_jobs(jobs: list[dict], workers: int, function=run_job) -> list[dict]:
    """Run `function` (a module-level function of one job) on `jobs`, `workers` at a time (spawned processes,
    one thread each); 1 runs them in this process."""
    from tqdm.auto import tqdm

    results = []
    if workers <= 1:
        for job in tqdm(jobs, desc="benchmark runs"):
            results.append(function(job))
        return results
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for data in tqdm(pool.imap(function, [dict(job, threads=1) for job in jobs]), total=len(jobs),
                         desc="benchmark runs"):
            results.append(data)
    return results


LATE_FRACTION = 1 / 3  # a run's score: the mean of its evaluations in the last third of training


def _is_late(step: int, last: int, fraction: float = LATE_FRACTION) -> bool:
    return step >= (1 - fraction) * last - 1e-9


def late_mean(history: list[dict], fraction: float = LATE_FRACTION) -> dict:
    """The mean of each numeric metric over the evaluations at steps >= (1 - fraction) * the last step (at least
    the last one): one checkpoint of a run that oscillates is a lottery (texture world, docs/demo.md)."""
    last = history[-1]["step"]
    late = [h for h in history if _is_late(h["step"], last, fraction) and h["step"] > 0] or [history[-1]]
    keys = [k for k in late[-1] if isinstance(late[-1][k], (int, float))]
    return {k: float(np.mean([h.get(k, math.nan) for h in late])) for k in keys}


def _write_text(path: str, text: str) -> None:
    def write(staging: str) -> None:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write, overwrite=True)


def _write_json(path: str, value) -> None:
    _write_text(path, json.dumps(value, indent=1))
