"""Algorithm 1 of Decoupled DMD (Liu et al., ICLR 2026) on one screen: the student's update (lines 5-43, with
Eq. 8's decoupled re-noise levels), the fake model's (lines 45-51), and one training step of both (TTUR).

The run it works in (`loop.DecoupledDMDTrainer`: the models on the denoiser contract, the optimizers, the one
seeded random stream, the cost meter) is reached through its public methods only; the run owns everything
around the algorithm (set-up, the loop, divergence, logs, states and files).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .denoiser import Conditioning, batched_x0
from .losses import (
    cfg_augmentation,
    classifier_free_guidance,
    distribution_matching,
    dm_reference_is_cfg,
    mean_variance_kl,
    normalize_update,
    per_image_statistics,
    proxy_loss,
    weighted_denoising_loss,
)
from .regression import RegressionLoss
from .schedules import renoise_levels_shared, sample_renoise_levels, uniform_shifted_levels


@dataclass(frozen=True)
class TeacherRows:
    """Which teacher predictions one student update needs, in the order of its one batched no-grad call.

    CA (Eq. 6/8) needs the teacher with and without the prompt at tau_CA (rows 0 and 1); DM needs the teacher
    with the prompt at tau_DM, which is the CA cond row itself when both terms share one re-noised sample
    (coupled schedules: original DMD), and DMD2's normaliser (`per_term_cfg`) adds the unconditional half at
    tau_DM. The update and the memory plan (`memory_plan.widest_no_grad_rows`) both read this one plan."""

    ca: bool  # rows 0, 1: x0_real(x_tauCA, cond), x0_real(x_tauCA, uncond)
    dm: bool  # the DM term's x0_real(x_tauDM, cond)
    dm_from_ca: bool  # levels shared with CA: the DM row is row 0, no row of its own
    dm_uncond: bool  # x0_real(x_tauDM, uncond) for the CFG reference of DM's normaliser
    dm_reference_cfg: bool  # DM is normalised against the CFG prediction at tau_DM (`per_term_cfg`)

    @classmethod
    def from_config(cls, config) -> "TeacherRows":
        ca, dm = config.cfg_augmentation, config.regularizer == "dm"
        dm_from_ca = ca and dm and renoise_levels_shared(config.renoise_schedule)
        reference_cfg = dm and dm_reference_is_cfg(config.update_normalization)
        return cls(ca=ca, dm=dm, dm_from_ca=dm_from_ca, dm_uncond=reference_cfg and not dm_from_ca,
                   dm_reference_cfg=reference_cfg)

    @property
    def dm_index(self) -> int:
        """Where the DM cond prediction sits in the call's output."""
        return 2 if self.ca and not self.dm_from_ca else 0

    @property
    def count(self) -> int:
        """Rows per sample in the batched teacher call."""
        return 2 * self.ca + (self.dm and not self.dm_from_ca) + self.dm_uncond


@dataclass
class UpdateTerms:
    """The two directions of Eq. 8 for one student update, and the teacher predictions that scale them."""

    delta_ca: Tensor | None = None
    delta_dm: Tensor | None = None
    x0_cfg: Tensor | None = None  # CA's normaliser reference: the CFG prediction at tau_CA
    x0_real_dm: Tensor | None = None  # x0_real(x_tauDM, cond)
    x0_dm_reference: Tensor | None = None  # DM's: x0_real at tau_DM, or the CFG prediction there


class DecoupledDMD:
    """Algorithm 1 over a run `run` (see the module's docstring), with DMD's regression loss beside the student's
    update where the config asks for it."""

    def __init__(self, run):
        self.run = run
        self.rows = TeacherRows.from_config(run.config)
        self.regression = RegressionLoss(run.config) if run.config.regression_loss_weight > 0 else None
        self._generator_sample: tuple[Conditioning, Tensor] | None = None  # the student update's own sample

    @property
    def config(self):
        return self.run.config

    # --- one training step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One student update and `fake_updates_per_step` fake updates (TTUR); returns their logs.

        By default the fake updates come first, each on a fresh student sample. With `share_generator_sample`
        the order is Algorithm 1's (student, then fake) and the first fake update trains on the student update's
        own detached sample, as DMD2 does."""
        config = self.config
        fakes = config.fake_updates_per_step if config.uses_fake_model else 0
        student_update = self.regression_only_step if config.regression_only else self.generator_step
        logs: dict[str, float] = {}
        if config.share_generator_sample:
            logs.update(student_update())
            samples = [self._generator_sample] + self.fake_samples(fakes - 1) if fakes else []
            fake_logs = [self.fake_step(sample) for sample in samples]
        else:
            fake_logs = [self.fake_step(sample) for sample in self.fake_samples(fakes)]
            logs.update(student_update())
        self._generator_sample = None
        if fake_logs:
            logs.update({k: sum(d[k] for d in fake_logs) / len(fake_logs) for k in fake_logs[0]})
        return logs

    # --- the student (generator) update: lines 5-43 -------------------------------------------------------
    def generator_step(self) -> dict[str, float]:
        """Algorithm 1 lines 5-43 with decoupled re-noise levels (Eq. 8): one student update."""
        run, config = self.run, self.config
        cond, step_index, noise = run.draw_batch()                                   # line 6
        regression = self.regression.backward(run) if self.regression else {}   # DMD's regression loss, beside
        with run.meter.phase("generator_simulation"):
            z_t = run.generator_input(cond, step_index, noise)                      # line 7
        t = run.level(run.levels[step_index], noise.shape[0])
        with run.meter.phase("generator_student"):
            x_gen = run.x0("student", z_t, t, cond, train=True)                     # line 8
        tau_ca, tau_dm = self.renoise_levels(t)                                      # lines 11-12 (30)
        with torch.no_grad(), run.meter.phase("generator_teacher_fake"):
            terms = self.update_terms(x_gen.detach(), cond, tau_ca, tau_dm)          # lines 13-26
        delta_ca, delta_dm = normalize_update(terms.delta_ca, terms.delta_dm, x_gen.detach(), terms.x0_cfg,
                                              terms.x0_dm_reference, config.update_normalization)
        deltas = [d for d in (delta_ca, delta_dm) if d is not None]
        delta_total = sum(deltas) if deltas else None                                # line 27
        with run.meter.phase("generator_update"):
            loss, logs = self.generator_loss(x_gen, delta_total, float(run.step_weights[step_index]))  # 42-43
            logs["grad_norm_student"] = run.optimize("student", loss, accumulate=bool(regression))
        self._generator_sample = (cond, x_gen.detach().float())
        return {**logs, **regression, **self._update_logs(x_gen, step_index, tau_ca, tau_dm, delta_ca, delta_dm)}

    def renoise_levels(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(tau_CA, tau_DM) for the student level t, from the configured schedule (Table 1)."""
        run = self.run
        tau_ca, tau_dm = sample_renoise_levels(self.config.renoise_schedule, t.cpu(), run.level_bounds,
                                               run.random.generator, self.config.timestep_shift)
        device = run.accelerator.device
        return tau_ca.to(device), tau_dm.to(device)

    def update_terms(self, x_gen: Tensor, cond: Conditioning, tau_ca: Tensor, tau_dm: Tensor) -> UpdateTerms:
        """Delta_CA (Eq. 6, with x0_cfg for its normaliser) and Delta_DM (with its normaliser's reference): every
        teacher row of `self.rows` in one batched call, then the fake model at tau_DM."""
        run, rows, scale, batch = self.run, self.rows, self.run.guidance_scale, x_gen.shape[0]
        schedule, uncond = run.adapter.schedule, run.uncond(batch)
        inputs: list[tuple[Tensor, Tensor, Conditioning]] = []
        if rows.ca:
            x_ca = schedule.renoise(x_gen, run.randn(batch), tau_ca)
            inputs += [(x_ca, tau_ca, cond), (x_ca, tau_ca, uncond)]
        if rows.dm:
            x_dm = x_ca if rows.dm_from_ca else schedule.renoise(x_gen, run.randn(batch), tau_dm)
            if not rows.dm_from_ca:
                inputs.append((x_dm, tau_dm, cond))
            if rows.dm_uncond:
                inputs.append((x_dm, tau_dm, uncond))
        predictions = self.teacher_predictions(inputs)
        terms = UpdateTerms()
        if rows.ca:
            terms.delta_ca = cfg_augmentation(predictions[0], predictions[1], scale)
            terms.x0_cfg = classifier_free_guidance(predictions[0], predictions[1], scale)
        if rows.dm:
            terms.x0_real_dm = terms.x0_dm_reference = predictions[rows.dm_index]
            if rows.dm_uncond:
                terms.x0_dm_reference = classifier_free_guidance(terms.x0_real_dm, predictions[rows.dm_index + 1],
                                                                 scale)
            elif rows.dm_reference_cfg:  # shared levels: the CFG prediction at tau_DM is CA's own
                terms.x0_dm_reference = terms.x0_cfg
            terms.delta_dm = distribution_matching(terms.x0_real_dm, run.x0("fake", x_dm, tau_dm, cond))
        return terms

    def teacher_predictions(self, inputs: list[tuple[Tensor, Tensor, Conditioning]]) -> list[Tensor]:
        """The teacher's x0 of every (x, level, cond) row, in one batched call."""
        return batched_x0(functools.partial(self.run.x0, "teacher"), inputs) if inputs else []

    def generator_loss(self, x_gen: Tensor, delta_total: Tensor | None,
                       step_weight: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """The proxy loss of line 42 (plus the Eq. 7 regulariser where chosen), and its logged parts; both are
        x0-space losses, scaled by the student step's weight (`generator_step_weighting`)."""
        config, logs = self.config, {}
        loss = x_gen.new_zeros((), dtype=torch.float32)
        if delta_total is not None:
            loss = loss + step_weight * proxy_loss(x_gen, delta_total, config.dmd_loss_weight)
        if config.regularizer == "mean_variance":
            kl = mean_variance_kl(x_gen, config.mean_variance_target_mean, config.mean_variance_target_var)
            logs["loss_mean_variance_kl"] = kl.item()
            loss = loss + step_weight * config.mean_variance_weight * kl
        logs["loss_generator"] = loss.item()
        return loss, logs

    @staticmethod
    def _update_logs(x_gen, step_index, tau_ca, tau_dm, delta_ca, delta_dm) -> dict[str, float]:
        logs = dict(tau_ca=tau_ca.float().mean().item(), tau_dm=tau_dm.float().mean().item(),
                    student_step=float(step_index))
        if delta_ca is not None:
            logs["ca_magnitude"] = delta_ca.abs().mean().item()
        if delta_dm is not None:
            logs["dm_magnitude"] = delta_dm.abs().mean().item()
        return {**logs, **per_image_statistics(x_gen.detach())}

    def regression_only_step(self) -> dict[str, float]:
        """The student's update in the regression-only control (`config.regression_only`): no generator sample,
        no teacher or fake call, one step on the regression loss's gradient alone."""
        logs = self.regression.backward(self.run, statistics=True)
        if logs:
            logs["loss_generator"] = self.regression.weight * logs["loss_regression"]
            logs["grad_norm_student"] = self.run.optimize("student", None)
        return logs

    # --- the fake model's update: lines 45-51 -------------------------------------------------------------
    def fake_step(self, sample: tuple[Conditioning, Tensor] | None = None) -> dict[str, float]:
        """Algorithm 1 lines 45-51: train the fake model to denoise a student sample x'_gen at tau'.

        `sample` (cond, x_gen) reuses the student update's own detached output (DMD2); without it a fresh
        student sample is drawn (backward simulation to a random student step)."""
        run = self.run
        with run.meter.phase("fake_sample"):
            if sample is None:
                cond, step_index, noise = run.draw_batch()
                with torch.no_grad():
                    z_t = run.generator_input(cond, step_index, noise)
                    level = run.level(run.levels[step_index], noise.shape[0])
                    x_gen = run.x0("student", z_t, level, cond).float()
            else:
                cond, x_gen = sample
        with run.meter.phase("fake_update"):
            batch = x_gen.shape[0]
            low = torch.full((batch,), run.level_bounds[0], dtype=torch.float64)
            tau = uniform_shifted_levels(low, run.level_bounds[1], run.random.generator,
                                         self.config.timestep_shift).to(run.accelerator.device)
            x_tau = run.adapter.schedule.renoise(x_gen, run.randn(batch), tau)
            x0_fake = run.x0("fake", x_tau, tau, cond, train=True)
            weight = run.adapter.fake_loss_weight(tau, self.config.fake_loss_target)
            loss = weighted_denoising_loss(x0_fake, x_gen, weight)
            grad_norm = run.optimize("fake", loss)
        return {"loss_fake": loss.item(), "grad_norm_fake": grad_norm}

    def fake_samples(self, count: int) -> list[tuple[Conditioning, Tensor] | None]:
        """Student samples for `count` fake updates: drawn one by one inside each update (None), or all at once
        in one batched backward simulation (`batch_fake_samples`; the student does not change between fake
        updates, so each sample has the same distribution)."""
        if count <= 0:
            return []
        if not self.config.batch_fake_samples or count == 1:
            return [None] * count
        with self.run.meter.phase("fake_sample"), torch.no_grad():
            return self.batched_student_samples(count)

    def batched_student_samples(self, count: int) -> list[tuple[Conditioning, Tensor]]:
        """`count` batches (cond, x_gen), each at its own random student step: one chain of student calls over
        all rows, a row leaving the batch at its step (its x0 there is x_gen); at most N calls in all."""
        run = self.run
        draws = [run.draw_batch() for _ in range(count)]
        batch = draws[0][2].shape[0]
        cond = Conditioning.cat([d[0] for d in draws])
        step_of_row = torch.tensor([d[1] for d in draws]).repeat_interleave(batch)
        x_gen = torch.empty((count * batch, *run.latent_shape), device=run.accelerator.device)
        active = torch.arange(count * batch)
        x = torch.cat([d[2] for d in draws])
        for index in range(int(step_of_row.max()) + 1):
            level = run.level(run.levels[index], len(active))
            x0 = run.x0("student", x, level, cond.select(active), work="simulation").float()
            done = step_of_row[active] == index
            x_gen[active[done].to(x_gen.device)] = x0[done.to(x0.device)]
            keep = step_of_row[active] > index
            if not keep.any():
                break
            active, x0 = active[keep], x0[keep.to(x0.device)]
            fresh = torch.randn(x0.shape, generator=run.random.generator).to(x0.device)
            x = run.adapter.schedule.renoise(x0, fresh, run.level(run.levels[index + 1], len(active))).to(x.dtype)
        return [(draws[i][0], x_gen[i * batch:(i + 1) * batch]) for i in range(count)]
