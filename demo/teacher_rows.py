"""The demo's teacher rows (the teacher with the world's solver at equal, double and four times the student's
network calls, and the grid's teacher pictures), sampled in a second process while the student trains.

None of them depends on the student, and on 2 CPU cores two one-thread processes get more done than one
two-thread process on models this small (docs/evidence.md), so the demo overlaps them with training and
waits for them only at its evaluation. If the second process cannot start or fails, the rows are sampled in
this process afterwards (same draws, same figures: only slower).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile

import torch
from torch import Tensor

logger = logging.getLogger("decoupled_dmd.demo")


# The comparison rows: the teacher at equal, double and four times the student's network calls (CFG: two a step).
CALL_FACTORS = {"teacher_equal_calls": 1, "teacher_double_calls": 2, "teacher_4x_calls": 4}


def grid_key(seed: int, steps: int, solver: str | None) -> str:
    return f"grid {seed} {steps} {solver}"


def plan_rows(prompts: list[str], noise_seed: int, columns: list[str], grid_seeds, steps: int, teacher_steps: int,
              solver: str | None) -> dict[str, dict]:
    """The demo's teacher rows for a `steps`-step student: the comparison rows (`CALL_FACTORS`) on the evaluation
    prompts from the split's noise seed, and per grid seed the grid's three teacher rows (`grid_key`): the
    trainer's DDIM at `teacher_steps`, and `solver` at half and at the student's step count."""
    rows = {key: {"prompts": prompts, "seed": noise_seed, "steps": max(1, steps * factor // 2), "solver": solver}
            for key, factor in CALL_FACTORS.items()}
    for seed in grid_seeds:
        for count, row_solver in ((teacher_steps, None), (max(1, steps // 2), solver), (steps, solver)):
            rows[grid_key(seed, count, row_solver)] = {"prompts": columns, "seed": seed, "steps": count,
                                                       "solver": row_solver}
    return rows


def sample_rows(spec: dict) -> dict[str, Tensor]:
    """Every row of `spec["rows"]` ({name: {prompts, seed, steps, solver}}): the teacher with CFG
    `spec["guidance"]`, by the world's solver (diffusers' scheduler) or, with solver None, the trainer's DDIM."""
    from ..trainer.adapters.diffusers import DiffusersAdapter, read_scheduler_config
    from .metrics import teacher_samples
    from .solvers import teacher_solver_samples

    adapter = DiffusersAdapter.from_pretrained(spec["teacher_dir"])
    scheduler_config = read_scheduler_config(spec["teacher_dir"], True)
    out = {}
    for name, row in spec["rows"].items():
        if row["solver"] is None:
            out[name] = teacher_samples(adapter, row["prompts"], row["seed"], spec["guidance"], steps=row["steps"])
        else:
            out[name] = teacher_solver_samples(adapter, scheduler_config, row["prompts"], row["seed"],
                                               spec["guidance"], row["solver"], row["steps"])
    return out


def _worker(spec: dict, path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo's first Ctrl-C still evaluates: it needs these rows
    torch.set_num_threads(1)
    rows = sample_rows(spec)
    torch.save(rows, path + ".partial")
    os.replace(path + ".partial", path)


class TeacherRows:
    """`start()` the rows in a spawned one-thread process; `result()` waits for them (or samples them here when
    the process failed). While the process runs, this process keeps one thread fewer."""

    def __init__(self, spec: dict, background: bool = True):
        self.spec, self.background = spec, background
        self.process: multiprocessing.process.BaseProcess | None = None
        self._folder = tempfile.mkdtemp(prefix="dmd-demo-teacher-")
        self.path = os.path.join(self._folder, "rows.pt")
        self._threads = torch.get_num_threads()

    def start(self) -> "TeacherRows":
        if not self.background:
            return self
        try:
            self.process = multiprocessing.get_context("spawn").Process(target=_worker, args=(self.spec, self.path),
                                                                        daemon=True)
            self.process.start()
        except (OSError, RuntimeError) as error:  # no processes here (a sandbox): sample them afterwards instead
            logger.warning("could not start the teacher rows' process (%s); sampling them after training", error)
            self.process = None
            return self
        torch.set_num_threads(max(1, self._threads - 1))
        return self

    def result(self) -> dict[str, Tensor]:
        try:
            if self.process is not None:
                self.process.join()
                torch.set_num_threads(self._threads)
                if self.process.exitcode == 0 and os.path.isfile(self.path):
                    return torch.load(self.path)
                logger.warning("the teacher rows' process failed (exit code %s); sampling them here",
                               self.process.exitcode)
            return sample_rows(self.spec)
        finally:
            self.close()

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join()
        torch.set_num_threads(self._threads)
        for name in os.listdir(self._folder) if os.path.isdir(self._folder) else []:
            os.remove(os.path.join(self._folder, name))
        if os.path.isdir(self._folder):
            os.rmdir(self._folder)
