"""An exponential moving average of the student's trained weights (`student_ema_decay`).

Training steps the raw weights; previews, evaluation and the saved student use the average. A few-step student
whose output statistics swing around their target from update to update (the texture world's background grey,
docs/demo.md) is then read at the centre of the swing instead of at a random phase of it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .networks import copy_exact


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay for the update that follows `updates` earlier ones: decay * (1 - decay**n) / (1 - decay**(n + 1)).

    This is the bias-corrected average (Adam's moments: m / (1 - decay**n) of an EMA m started at zero) written as
    a running update: n = 0 copies the weights, and from then on each weight counts decay**age of the newest, over
    the updates so far only. A plain EMA started at the first weights would keep decay**n of them (0.97**25 = 0.47
    after 25 updates); diffusers' warm-up (1 + n) / (10 + n) holds the decay under 0.95 for 170 updates, longer
    than a whole short run."""
    return decay * (1.0 - decay ** updates) / (1.0 - decay ** (updates + 1))


class StudentEma:
    """fp32 shadow copies of the student's trained tensors (LoRA: a few MB; full mode: one more UNet copy)."""

    def __init__(self, weights: dict[str, Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"student_ema_decay {decay!r} must be in (0, 1)")
        self.decay = decay
        self.shadow = {name: value.detach().float().clone() for name, value in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, Tensor], updates: int) -> float:
        """shadow <- d * shadow + (1 - d) * weights with d = ema_decay_at(decay, updates); returns d."""
        decay = ema_decay_at(self.decay, updates)
        for name, value in weights.items():
            self.shadow[name].lerp_(value.detach().float(), 1.0 - decay)
        return decay

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.contiguous() for name, value in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        copy_exact(self.shadow, state, "student EMA")

    @contextlib.contextmanager
    def applied(self, weights: dict[str, Tensor]):
        """Inside: `weights` (the live tensors, e.g. `Roles.trainable_state_dict`) hold the average; after: the
        raw weights again, bit for bit."""
        with torch.no_grad():
            backup = {name: value.detach().clone() for name, value in weights.items()}
            for name, value in weights.items():
                value.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in weights.items():
                    value.copy_(backup[name])
