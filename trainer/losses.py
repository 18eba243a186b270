"""The Decoupled DMD generator update in x0 space, its normalisation, and the regularisers. Pure torch.

Scores are written as denoised predictions: s(x_tau) is proportional to x0(x_tau) - x_tau, so a difference
of scores at one level is a difference of x0 predictions up to a positive per-level factor that the update
normalisation absorbs (as in DMD2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import append_dims

UPDATE_NORMALIZATIONS = ("per_term", "per_term_cfg", "shared", "none")
REGULARIZERS = ("dm", "mean_variance", "none")
GENERATOR_STEP_WEIGHTINGS = ("x0", "prediction")


def classifier_free_guidance(x0_cond: Tensor, x0_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Eq. 4 in x0 space: x0_uncond + alpha * (x0_cond - x0_uncond)."""
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


def cfg_augmentation(x0_real_cond: Tensor, x0_real_uncond: Tensor, guidance_scale: float) -> Tensor:
    """The CA term of Eq. 6/8: (alpha - 1) * (x0_real(x_tauCA, cond) - x0_real(x_tauCA, uncond))."""
    return (guidance_scale - 1.0) * (x0_real_cond - x0_real_uncond)


def distribution_matching(x0_real_cond: Tensor, x0_fake_cond: Tensor) -> Tensor:
    """The DM term of Eq. 6/8: x0_real(x_tauDM, cond) - x0_fake(x_tauDM, cond)."""
    return x0_real_cond - x0_fake_cond


def dmd_update_scale(x: Tensor, x0_reference: Tensor, eps: float = 1e-4) -> Tensor:
    """DMD2's per-sample normaliser mean_{C,H,W} |x - x0_reference|, shape (B,), guarded.

    A non-finite scale (NaN/inf in the teacher's prediction) becomes 1 and a tiny one is floored at `eps`,
    so the normalised update never divides by zero or spreads NaN from one sample to the batch.
    """
    scale = (x.detach().float() - x0_reference.float()).abs().flatten(1).mean(dim=1)
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    return scale.clamp_min(eps)


def normalize_update(
    ca_term: Tensor | None,
    dm_term: Tensor | None,
    x: Tensor,
    x0_ca_reference: Tensor | None,
    x0_dm_reference: Tensor | None,
    mode: str,
) -> tuple[Tensor | None, Tensor | None]:
    """Normalise the CA and DM terms of the generator update.

    DMD2 divides its one update by mean|x - x0_cfg(tau)|, the CFG teacher's error at the (single) re-noise
    level. With decoupled levels each term has its own level, hence the per-term modes; they differ only in
    the DM reference the caller passes:

    per_term: CA / mean|x - x0_cfg(tau_CA)| and DM / mean|x - x0_real_cond(tau_DM)|: the DM scale is the
        conditional teacher's error, not DMD2's (it saves the unconditional call at tau_DM);
    per_term_cfg: CA / mean|x - x0_cfg(tau_CA)| and DM / mean|x - x0_cfg(tau_DM)|, DMD2's normaliser at each
        term's own level (one extra unconditional teacher call at tau_DM); with coupled levels both scales are
        DMD2's one shared scale, bit for bit;
    shared: both terms / mean|x - x0_cfg(tau_CA)| (DMD2 in the coupled-shared setting), or the DM reference
        when there is no CA term;
    none: unchanged.
    """
    if mode == "none":
        return ca_term, dm_term
    if mode in ("per_term", "per_term_cfg"):
        if ca_term is not None:
            ca_term = ca_term / append_dims(dmd_update_scale(x, x0_ca_reference), x.ndim)
        if dm_term is not None:
            dm_term = dm_term / append_dims(dmd_update_scale(x, x0_dm_reference), x.ndim)
        return ca_term, dm_term
    if mode == "shared":
        reference = x0_ca_reference if ca_term is not None else x0_dm_reference
        scale = append_dims(dmd_update_scale(x, reference), x.ndim)
        return (
            None if ca_term is None else ca_term / scale,
            None if dm_term is None else dm_term / scale,
        )
    raise ValueError(f"unknown update_normalization {mode!r}; expected one of {UPDATE_NORMALIZATIONS}")


def dm_reference_is_cfg(mode: str) -> bool:
    """Whether the DM term's normaliser needs the CFG prediction at tau_DM (one unconditional call there)."""
    return mode == "per_term_cfg"


def generator_step_weights(prediction_loss_weights: Tensor, mode: str) -> Tensor:
    """Per-student-step weights of the proxy loss, from w(t_k) = ||d x0 / d prediction||^-2 at each step's level
    (`NoiseSchedule.denoising_loss_weight`: alpha^2 / sigma^2 for eps, 1 / sigma^2 for v and flow).

    'x0' (Algorithm 1): every step's x0-space update counts alike, weights 1. The student's gradient is then
    the update times d x0 / d prediction = 1 / sqrt(w(t)), which for an eps model on SDXL's schedule is 14.6 at
    timestep 999 and 0.69 at 249: the first step's gradients are about 20x the last one's, fill Adam's second
    moment and leave the clean steps (detail) to learn slowly. 'prediction': weight sqrt(w(t_k)), so that each
    step moves the network's own output by its update, divided by the weights' mean over the grid (a neutral
    overall scale for gradient clipping). The fixed point per step is the same; only the steps' relative
    weighting changes.
    """
    if mode == "x0":
        return torch.ones_like(prediction_loss_weights)
    if mode == "prediction":
        scale = prediction_loss_weights.double().sqrt()
        return (scale / scale.mean()).to(prediction_loss_weights.dtype)
    raise ValueError(f"unknown generator_step_weighting {mode!r}; expected one of {GENERATOR_STEP_WEIGHTINGS}")


def proxy_loss(x: Tensor, update: Tensor, weight: float = 1.0) -> Tensor:
    """Algorithm 1 line 42: 0.5 * mean ||x - stopgrad(x + lambda * Delta)||^2.

    Its gradient with respect to x is -lambda * Delta / numel, so descending it moves x along Delta.
    The mean (not sum) keeps DMD2's learning rates meaningful.
    """
    target = (x + weight * update).detach()
    return 0.5 * torch.nn.functional.mse_loss(x.float(), target.float(), reduction="mean")


def mean_variance_kl(x: Tensor, target_mean: float, target_var: float, eps: float = 1e-8) -> Tensor:
    """Eq. 7: mean over the batch of KL(N(mu_i, var_i) || N(mu_target, var_target)) of per-image statistics."""
    flat = x.float().flatten(1)
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=False).clamp_min(eps)
    kl = 0.5 * ((var + (mean - target_mean) ** 2) / target_var - 1.0 - torch.log(var / target_var))
    return kl.mean()


def weighted_denoising_loss(x0_pred: Tensor, x0_target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Algorithm 1 line 50 with an optional per-sample weight (the model's native objective in x0 space)."""
    per_sample = (x0_pred.float() - x0_target.float()).pow(2).flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


def per_image_statistics(x: Tensor) -> dict[str, float]:
    """Collapse signal of the paper (Fig. 3): batch averages of each image's mean and std, and the extremes."""
    flat = x.detach().float().flatten(1)
    means, stds = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
    return {
        "gen_mean": means.mean().item(),
        "gen_std": stds.mean().item(),
        "gen_std_max": stds.max().item(),
        "gen_abs_max": flat.abs().max().item(),
    }
