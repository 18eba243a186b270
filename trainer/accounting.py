"""Where one generator update's compute goes: UNet forward-equivalents by role and kind, seconds by phase.

A forward-equivalent (FE) is one backbone forward over `train_batch_size` samples at the training resolution:
a teacher call on 3 * B rows counts 3. A backward costs about two forwards; with gradient checkpointing the
forward of each checkpointed block runs again inside the backward (one more). `expected_forward_equivalents`
gives the count Algorithm 1 implies for a config (pure arithmetic, tested against hand-computed values);
`CostMeter` counts what the trainer actually ran, and times each phase.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

ROLES = ("student", "teacher", "fake")
KINDS = ("simulation", "forward", "train_forward", "backward", "recompute")
PHASES = ("fake_sample", "fake_update", "generator_simulation", "generator_student", "generator_teacher_fake",
          "generator_update")
BACKWARD_FE = 2.0  # a backward pass costs about two forwards (gradients w.r.t. activations and weights)


def expected_forward_equivalents(student_steps: int, fake_updates: int, cfg_augmentation: bool = True,
                                 distribution_matching: bool = True, shared_levels: bool = False,
                                 gradient_checkpointing: bool = False, share_generator_sample: bool = False,
                                 dm_cfg_reference: bool = False) -> dict[str, float]:
    """Expected FEs of one generator update (Algorithm 1), by role, with the student step drawn uniformly.

    Backward simulation to step k costs k student forwards; k is uniform over 0..N-1, so (N - 1) / 2 on
    average, for the generator turn and for each fake update. A trained forward costs 1 + 2 (backward)
    (+ 1 recompute with gradient checkpointing). The teacher runs CA cond and uncond (2) and DM cond (1;
    0 when the levels are shared and the CA cond prediction is reused, as original DMD; +1 uncond at tau_DM
    for `dm_cfg_reference`, the per_term_cfg normaliser, unless the levels are shared). The fake runs
    once (no grad) in the generator turn and trains once per fake update. `share_generator_sample`
    trains the first fake update on the generator turn's own detached sample (DMD2): no simulation and no
    student forward for it.
    """
    simulation = (student_steps - 1) / 2.0
    trained = 1.0 + BACKWARD_FE + (1.0 if gradient_checkpointing else 0.0)
    student = simulation + trained
    teacher = 0.0
    if cfg_augmentation:
        teacher += 2.0
    fake = 0.0
    if distribution_matching:
        if not (shared_levels and cfg_augmentation):
            teacher += 2.0 if dm_cfg_reference else 1.0
        fake += 1.0 + fake_updates * trained
        sampled = fake_updates - (1 if share_generator_sample and fake_updates else 0)
        student += sampled * (simulation + 1.0)
    out = {"student": student, "teacher": teacher, "fake": fake}
    out["total"] = sum(out.values())
    return out


class CostMeter:
    """Counts backbone work in FEs by (role, kind) and wall seconds by phase, per generator update.

    `synchronize` (e.g. torch.cuda.synchronize) runs at each phase boundary so that asynchronous devices
    charge kernels to the phase that queued them.
    """

    def __init__(self, batch_size: int, gradient_checkpointing: bool = False, synchronize=None):
        self.batch_size = batch_size
        self.gradient_checkpointing = gradient_checkpointing
        self.synchronize = synchronize or (lambda: None)
        self.reset()

    def reset(self) -> None:
        self.work: dict[tuple[str, str], float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self._pending: dict[str, float] = defaultdict(float)

    def forward(self, role: str, rows: int, work: str = "forward") -> None:
        """A backbone call on `rows` samples; `work` is one of KINDS ('train_forward' expects a later
        `backward(role)`)."""
        self.work[(role, work)] += rows / self.batch_size
        if work == "train_forward":
            self._pending[role] += rows / self.batch_size

    def backward(self, role: str) -> None:
        rows = self._pending.pop(role, 0.0)
        self.work[(role, "backward")] += BACKWARD_FE * rows
        if self.gradient_checkpointing:
            self.work[(role, "recompute")] += rows

    @contextmanager
    def phase(self, name: str):
        self.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[name] += time.perf_counter() - started

    def by_role(self) -> dict[str, float]:
        out = {role: 0.0 for role in ROLES}
        for (role, _), value in self.work.items():
            out[role] = out.get(role, 0.0) + value
        out["total"] = sum(out[r] for r in ROLES)
        return out

    def logs(self) -> dict[str, float]:
        """Flat numbers for the training log: fe_<role>, fe_<role>_<kind>, fe_total, seconds_<phase>.

        The same keys every update and on every process (zeros included): data-parallel runs average the
        logs in one collective, which needs equal lists."""
        logs = {f"fe_{role}": value for role, value in self.by_role().items()}
        logs.update({f"fe_{role}_{kind}": self.work.get((role, kind), 0.0) for role in ROLES for kind in KINDS})
        logs.update({f"seconds_{name}": self.seconds.get(name, 0.0) for name in PHASES})
        logs.update({f"seconds_{name}": value for name, value in self.seconds.items() if name not in PHASES})
        return logs
