"""Noise levels, re-noising and the re-noise level (tau) schedules of Decoupled DMD. Pure torch, no I/O.

Everything here speaks the paper's *level* ``t`` in [0, 1] (flow-matching notation: 0 is pure noise, 1 is
clean data). A `NoiseSchedule` maps a level to a model's own coordinates: the re-noising coefficients
``x_t = alpha * x0 + sigma * noise``, the timestep the network is called with, and the k-diffusion / ComfyUI
sigma. The tau samplers are written once on levels and work for every schedule.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
RENOISE_SCHEDULES = ("coupled-shared", "decoupled-full", "decoupled-constrained", "decoupled-hybrid")
LR_SCHEDULERS = ("constant", "linear", "cosine")


def learning_rate_factor(step: int, scheduler: str, warmup: int = 0, total: int = 0) -> float:
    """The learning-rate multiplier of the update after `step` scheduler steps (kohya's and diffusers' names):
    a linear warm-up (step + 1) / warmup over the first `warmup` updates, then 1 (constant), or a decay from 1
    to 0 at update `total`: linear (total - step) / (total - warmup), or cosine 0.5 * (1 + cos(pi * progress))
    with progress = (step - warmup) / (total - warmup)."""
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {scheduler!r}; expected one of {LR_SCHEDULERS}")
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def append_dims(values: Tensor, target_ndim: int) -> Tensor:
    """Broadcast per-sample values (B,) against a (B, ...) tensor of any rank (images, video latents)."""
    missing = target_ndim - values.ndim
    if missing < 0:
        raise ValueError(f"values have {values.ndim} dims, more than the target's {target_ndim}")
    return values[(...,) + (None,) * missing]


class NoiseSchedule(ABC):
    """A model's forward process expressed on the paper's level t (0 noise, 1 clean)."""

    num_train_timesteps: int

    @abstractmethod
    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """Coefficients of ``x_t = alpha * x0 + sigma * noise`` at each level (float64 precision inside)."""

    @abstractmethod
    def timestep(self, level: Tensor) -> Tensor:
        """The timestep the network is conditioned on at each level."""

    @abstractmethod
    def level(self, timestep: Tensor | float | int) -> Tensor:
        """Inverse of `timestep`: the level a model timestep stands for."""

    @abstractmethod
    def valid_timestep_range(self) -> tuple[float, float]:
        """Smallest and largest timestep this schedule accepts."""

    def k_sigma(self, level: Tensor) -> Tensor:
        """The sigma that k-diffusion and ComfyUI index this model by."""
        alpha, sigma = self.alpha_sigma(level)
        return sigma / alpha

    def renoise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """Re-noise a clean sample to `level` (the forward process q(x_t | x0))."""
        alpha, sigma = self.alpha_sigma(level)
        alpha = append_dims(alpha.to(x0.dtype), x0.ndim)
        sigma = append_dims(sigma.to(x0.dtype), x0.ndim)
        return alpha * x0 + sigma * noise

    def denoising_loss_weight(self, level: Tensor, prediction: "Prediction | str") -> Tensor:
        """Weight w(t) with ``||native_pred - native_target||^2 == w(t) * ||x0_pred - x0||^2`` (`Prediction`)."""
        return get_prediction(prediction).loss_weight(*self.alpha_sigma(level))


class DiscreteVPSchedule(NoiseSchedule):
    """DDPM variance-preserving schedule with integer timesteps (SD1.5, SDXL).

    Timestep k covers the level bin (1 - (k+1)/T, 1 - k/T]; its own level is the clean edge 1 - k/T, so a
    tau sampled cleaner than a student step at timestep k (by more than float error, 1e-9) lands below k.
    """

    def __init__(self, alphas_cumprod: Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if alphas_cumprod.numel() < 2 or not torch.all((alphas_cumprod > 0) & (alphas_cumprod < 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values strictly between 0 and 1")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = alphas_cumprod.numel()

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """The SD1.5/SDXL schedule ("scaled_linear" betas)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_k_sigmas(cls, sigmas: Tensor):
        """Build from a k-diffusion sigma table (ComfyUI's ``model_sampling.sigmas``): alpha_bar = 1/(1+sigma^2)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        return cls(1.0 / (1.0 + sigmas**2))

    def timestep_index(self, level: Tensor) -> Tensor:
        continuous = (1.0 - torch.as_tensor(level, dtype=torch.float64)) * self.num_train_timesteps
        # 1e-6 absorbs float error in 1 - (1 - k/T): level(k) must map back to k, not k - 1.
        return (continuous + 1e-6).floor().clamp(0, self.num_train_timesteps - 1).long()

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        alpha_bar = self._table(torch.as_tensor(level).device)[self.timestep_index(level)]
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def _table(self, device) -> Tensor:
        """alphas_cumprod on `device`, copied there once (not on every call of a training step)."""
        device = torch.device(device)
        if device.type in ("cpu", "meta"):
            return self.alphas_cumprod if device.type == "cpu" else self.alphas_cumprod.to(device)
        tables = self.__dict__.setdefault("_tables", {})
        if device not in tables:
            tables[device] = self.alphas_cumprod.to(device)
        return tables[device]

    def timestep(self, level: Tensor) -> Tensor:
        return self.timestep_index(level).to(torch.float64)

    def level(self, timestep) -> Tensor:
        return 1.0 - torch.as_tensor(timestep, dtype=torch.float64) / self.num_train_timesteps

    def valid_timestep_range(self) -> tuple[float, float]:
        return 0.0, float(self.num_train_timesteps - 1)


class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule: ``x_t = t * x0 + (1 - t) * noise``; timestep = (1 - t) * T as in diffusers."""

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        level = torch.as_tensor(level, dtype=torch.float64)
        return level, 1.0 - level

    def k_sigma(self, level: Tensor) -> Tensor:
        # ComfyUI's CONST model sampling indexes flow models by the noise fraction itself.
        return 1.0 - torch.as_tensor(level, dtype=torch.float64)

    def timestep(self, level: Tensor) -> Tensor:
        return (1.0 - torch.as_tensor(level, dtype=torch.float64)) * self.num_train_timesteps

    def level(self, timestep) -> Tensor:
        return 1.0 - torch.as_tensor(timestep, dtype=torch.float64) / self.num_train_timesteps

    def valid_timestep_range(self) -> tuple[float, float]:
        return 0.0, float(self.num_train_timesteps)


class Prediction(ABC):
    """What a network outputs, as an object (ComfyUI's `model_sampling` classes play this part): how x0 is read
    from it, and how its own regression loss weighs against an x0 loss. The adapters own one; above the
    denoiser contract nothing looks at its name."""

    name: str

    @abstractmethod
    def x0(self, x_t: Tensor, output: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The denoised sample from the network's output at x_t = alpha * x0 + sigma * noise (alpha, sigma
        already broadcast to x_t)."""

    @abstractmethod
    def loss_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """w(t) with ``||native_pred - native_target||^2 == w(t) * ||x0_pred - x0||^2``: lets the fake model be
        trained on the teacher's own objective while every loss is written in x0 space."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsilonPrediction(Prediction):
    name = "epsilon"

    def x0(self, x_t, output, alpha, sigma):
        return (x_t - sigma * output) / alpha

    def loss_weight(self, alpha, sigma):
        return (alpha / sigma) ** 2  # the SNR


class VPrediction(Prediction):
    name = "v_prediction"

    def x0(self, x_t, output, alpha, sigma):
        return alpha * x_t - sigma * output  # v = alpha * eps - sigma * x0 with alpha^2 + sigma^2 = 1

    def loss_weight(self, alpha, sigma):
        return 1.0 / sigma**2


class FlowPrediction(Prediction):
    name = "flow"

    def x0(self, x_t, output, alpha, sigma):
        # diffusers' flow matching velocity: v = noise - x0, x_t = alpha * x0 + sigma * noise with alpha = 1 - sigma
        return x_t - sigma * output

    def loss_weight(self, alpha, sigma):
        return 1.0 / sigma**2


PREDICTIONS: dict[str, Prediction] = {p.name: p for p in (EpsilonPrediction(), VPrediction(), FlowPrediction())}


def get_prediction(prediction: Prediction | str) -> Prediction:
    """The `Prediction` of a name (as diffusers' scheduler configs and the files' metadata spell it)."""
    if isinstance(prediction, Prediction):
        return prediction
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction_type {prediction!r}; expected one of {PREDICTION_TYPES}")
    return PREDICTIONS[prediction]


def prediction_to_x0(x_t: Tensor, prediction: Tensor, alpha: Tensor, sigma: Tensor,
                     prediction_type: Prediction | str) -> Tensor:
    """Resolve a network output (eps, v or flow velocity) to the denoised sample x0."""
    alpha = append_dims(alpha.to(x_t.dtype), x_t.ndim)
    sigma = append_dims(sigma.to(x_t.dtype), x_t.ndim)
    return get_prediction(prediction_type).x0(x_t, prediction, alpha, sigma)


def timestep_level_bounds(schedule: NoiseSchedule, min_timestep: int, max_timestep: int) -> tuple[float, float]:
    """Level interval (lo, hi] whose samples land on timesteps min_timestep..max_timestep (DMD2: 20..980)."""
    if not 0 <= min_timestep < max_timestep:
        raise ValueError(f"need 0 <= min_timestep < max_timestep, got {min_timestep} and {max_timestep}")
    if max_timestep > schedule.valid_timestep_range()[1]:
        raise ValueError(f"max_timestep {max_timestep} is beyond this model's last timestep "
                         f"{schedule.valid_timestep_range()[1]:g} (DMD2 uses 980 on the 1000-step SD schedule)")
    total = schedule.num_train_timesteps
    low, high = 1.0 - max_timestep / total, 1.0 - min_timestep / total
    if isinstance(schedule, DiscreteVPSchedule):
        # Timestep k owns the level bin (1-(k+1)/T, 1-k/T]: cover bins min..max inclusive.
        low = 1.0 - (max_timestep + 1) / total
    if float(schedule.alpha_sigma(torch.tensor(high))[1]) == 0.0:
        raise ValueError(f"min_timestep {min_timestep} leaves no noise on this model (flow: use >= 1); "
                         "re-noised samples would be clean and the fake model's loss weight infinite")
    return low, high


def uniform_levels(low: Tensor, high: float, generator: torch.Generator | None = None) -> Tensor:
    """Sample tau ~ U(low, high] per sample; `low` is a (B,) tensor (bounds clamped so low <= high)."""
    low = torch.as_tensor(low, dtype=torch.float64).clamp(max=high)
    unit = torch.rand(low.shape, generator=generator, dtype=torch.float64, device=low.device)
    return high - (high - low) * unit  # unit in [0, 1) puts tau in (low, high]


def shift_sigma(sigma, shift: float):
    """SD3 / Z-Image's timestep shift on the noise fraction (a flow model's sigma): shift s / (1 + (shift - 1) s)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shift_level(level: Tensor, shift: float) -> Tensor:
    """A pre-shift level to the shifted one: `shift_sigma` on s = 1 - level. Identity (the same tensor) for
    shift 1."""
    if shift == 1.0:
        return level
    return 1.0 - shift_sigma(1.0 - level, shift)


def unshift_level(level: Tensor, shift: float) -> Tensor:
    """Inverse of `shift_level`: s = s' / (shift - (shift - 1) s')."""
    if shift == 1.0:
        return level
    sigma = 1.0 - level
    return 1.0 - sigma / (shift - (shift - 1.0) * sigma)


def uniform_shifted_levels(low: Tensor, high: float, generator: torch.Generator | None = None,
                           shift: float = 1.0) -> Tensor:
    """tau uniform in pre-shift level between the pre-shift images of (low, high], then shifted: with shift 1
    exactly `uniform_levels`."""
    if shift == 1.0:
        return uniform_levels(low, high, generator)
    low = torch.as_tensor(low, dtype=torch.float64)
    high_pre = float(unshift_level(torch.tensor(float(high), dtype=torch.float64), shift))
    return shift_level(uniform_levels(unshift_level(low, shift), high_pre, generator), shift)


def renoise_levels_shared(schedule_name: str) -> bool:
    """Whether `schedule_name` re-noises CA and DM at one shared level (original DMD: one sample, one tau)."""
    if schedule_name not in RENOISE_SCHEDULES:
        raise ValueError(f"unknown renoise_schedule {schedule_name!r}; expected one of {RENOISE_SCHEDULES}")
    return schedule_name == "coupled-shared"


def sample_renoise_levels(
    schedule_name: str,
    student_level: Tensor,
    level_bounds: tuple[float, float],
    generator: torch.Generator | None = None,
    shift: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Re-noise levels (tau_CA, tau_DM) for one generator update (Table 1 of the paper).

    ``student_level`` is the level t of the student's input per sample. With (lo, hi] the allowed levels:
    coupled-shared: one tau ~ U(lo, hi] for both terms (original DMD);
    decoupled-full: independent tau_CA, tau_DM ~ U(lo, hi];
    decoupled-constrained: both ~ U(max(t, lo), hi];
    decoupled-hybrid: tau_CA ~ U(max(t, lo), hi] (only what the student has not resolved yet), tau_DM ~ U(lo, hi].
    With a timestep `shift` the uniform draws are in pre-shift level (t, lo and hi mapped back by
    `unshift_level`) and each tau is shifted after (the Z-Image authors' recipe); the shift is monotone, so
    tau_CA > t still holds.
    """
    lo, hi = level_bounds
    student_level = torch.as_tensor(student_level, dtype=torch.float64)
    full_low = torch.full_like(student_level, lo)
    constrained_low = student_level.clamp(min=lo)

    def draw(low: Tensor) -> Tensor:
        return uniform_shifted_levels(low, hi, generator, shift)

    if schedule_name == "coupled-shared":
        tau = draw(full_low)
        return tau, tau.clone()
    if schedule_name == "decoupled-full":
        return draw(full_low), draw(full_low)
    if schedule_name == "decoupled-constrained":
        return draw(constrained_low), draw(constrained_low)
    if schedule_name == "decoupled-hybrid":
        return draw(constrained_low), draw(full_low)
    raise ValueError(f"unknown renoise_schedule {schedule_name!r}; expected one of {RENOISE_SCHEDULES}")


def teacher_sampling_levels(schedule: NoiseSchedule, steps: int) -> list[float]:
    """Evenly spaced levels for an N-step teacher sampler, from the noisiest timestep to clean (1.0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _, max_timestep = schedule.valid_timestep_range()
    start = float(schedule.level(max_timestep))
    return [start + (1.0 - start) * i / steps for i in range(steps)] + [1.0]


def is_strictly_decreasing(values) -> bool:
    return all(a > b for a, b in zip(values, values[1:]))


def parse_student_timesteps(value, name: str = "student_timesteps", minimum: int | None = 0) -> list[int]:
    """The one reader of a student grid a user writes (config, CLI, node): text ('999, 749, 499, 249'; commas
    or semicolons) or a sequence of whole numbers, strictly decreasing (noisy to clean) and >= `minimum`.
    ValueError naming `name` otherwise. `check_student_timesteps` then checks it against a model's range."""
    example = "e.g. 999,749,499,249"
    if isinstance(value, str):
        items = str(value).strip().strip("[]").replace(";", ",").split(",")  # '[999, 499]' as TOML writes it
        if items and not items[-1].strip():
            items = items[:-1]  # one trailing comma is harmless
        if any(not item.strip() for item in items):
            raise ValueError(f"{name} {value!r}: an empty entry between commas; write whole numbers separated by "
                             f"commas, {example}")
    else:
        items = value
    try:
        values = [int(v) for v in items]
    except (TypeError, ValueError):
        values = None
    if values is not None and not isinstance(value, str) and any(
            isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in items):
        values = None
    if values is None:
        raise ValueError(f"{name} {value!r}: write whole numbers separated by commas, {example}")
    if not values or not is_strictly_decreasing(values) or (minimum is not None and min(values) < minimum):
        raise ValueError(f"{name} {value!r}: need non-negative, strictly decreasing timesteps (noisy to clean), "
                         f"{example}")
    return values


def check_student_timesteps(schedule: NoiseSchedule, timesteps, min_timestep: int) -> None:
    """Fail early on a student grid the schedule cannot express (its range; fractional flow timesteps allowed)."""
    low, high = schedule.valid_timestep_range()
    if not timesteps:
        raise ValueError("student_timesteps is empty; give the student's timesteps, e.g. [999, 749, 499, 249]")
    if not is_strictly_decreasing(list(timesteps)):
        raise ValueError(f"student_timesteps must be strictly decreasing (noisy to clean), got {list(timesteps)}")
    for value in timesteps:
        if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"student timestep {value} is outside this model's range [{low:g}, {high:g}]")
    if timesteps[-1] <= min_timestep:
        raise ValueError(
            f"the last student timestep {timesteps[-1]} must be above min_timestep {min_timestep}: "
            "re-noising must be able to reach levels cleaner than every student step"
        )
