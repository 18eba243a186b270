"""The generator update terms, their normalisation and the regularisers, checked against hand-computed values."""

import math

import pytest
import torch

from decoupled_dmd.trainer.losses import (
    REGULARIZERS,
    UPDATE_NORMALIZATIONS,
    cfg_augmentation,
    classifier_free_guidance,
    distribution_matching,
    dmd_update_scale,
    generator_step_weights,
    mean_variance_kl,
    normalize_update,
    per_image_statistics,
    proxy_loss,
    weighted_denoising_loss,
)


def test_constants():
    assert UPDATE_NORMALIZATIONS == ("per_term", "per_term_cfg", "shared", "none")
    assert set(REGULARIZERS) == {"dm", "mean_variance", "none"}


# ------------------------------------------------------------------------------------------------------
# CFG, CA and DM terms
# ------------------------------------------------------------------------------------------------------
def test_hand_values_cfg_ca_dm():
    cond = torch.tensor([3.0, 1.0])
    uncond = torch.tensor([1.0, 2.0])
    fake = torch.tensor([0.5, 1.0])
    # CFG (Eq. 4): u + 4.5 (c - u) = [1 + 9, 2 - 4.5]
    assert torch.allclose(classifier_free_guidance(cond, uncond, 4.5), torch.tensor([10.0, -2.5]))
    # CA: (4.5 - 1) * (c - u) = 3.5 * [2, -1]
    assert torch.allclose(cfg_augmentation(cond, uncond, 4.5), torch.tensor([7.0, -3.5]))
    # DM: c - f
    assert torch.allclose(distribution_matching(cond, fake), torch.tensor([2.5, 0.0]))
    # alpha = 1: no CFG, CA vanishes
    assert torch.equal(cfg_augmentation(cond, uncond, 1.0), torch.zeros(2))
    assert torch.allclose(classifier_free_guidance(cond, uncond, 1.0), cond)
    # alpha = 0: the unconditional prediction; CA = -(c - u)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 0.0), uncond)
    assert torch.allclose(cfg_augmentation(cond, uncond, 0.0), torch.tensor([-2.0, 1.0]))


def test_hand_values_sum_equals_cfg_minus_fake():
    # [7, -3.5] + [2.5, 0] = [9.5, -3.5] = [10, -2.5] - [0.5, 1]
    cond, uncond, fake = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    total = cfg_augmentation(cond, uncond, 4.5) + distribution_matching(cond, fake)
    assert torch.allclose(total, torch.tensor([9.5, -3.5]))
    assert torch.allclose(total, classifier_free_guidance(cond, uncond, 4.5) - fake)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, 2.0, 4.5, 7.5, 12.0])
def test_decoupled_update_equals_dmd_update_when_taus_coincide(alpha):
    """Eq. 6 vs Eq. 3: with tau_CA = tau_DM (same teacher outputs), CA + DM == s_cfg - s_fake."""
    generator = torch.Generator().manual_seed(int(alpha * 10))
    cond, uncond, fake = (torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    decoupled = cfg_augmentation(cond, uncond, alpha) + distribution_matching(cond, fake)
    coupled = classifier_free_guidance(cond, uncond, alpha) - fake
    assert torch.allclose(decoupled, coupled, rtol=1e-12, atol=1e-12)
    # and with "none" normalisation the pipeline keeps the identity
    ca, dm = normalize_update(cfg_augmentation(cond, uncond, alpha), distribution_matching(cond, fake),
                              fake, None, None, "none")
    assert torch.allclose(ca + dm, coupled, rtol=1e-12, atol=1e-12)


def test_shared_normalisation_is_dmd2_with_coupled_levels():
    """coupled + shared: (CA + DM) / mean|x - x0_cfg| == DMD2's (x0_cfg - x0_fake) / mean|x - x0_cfg|."""
    generator = torch.Generator().manual_seed(3)
    x, cond, uncond, fake = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(4))
    x0_cfg = classifier_free_guidance(cond, uncond, 3.0)
    ca, dm = normalize_update(cfg_augmentation(cond, uncond, 3.0), distribution_matching(cond, fake),
                              x, x0_cfg, cond, "shared")
    scale = (x - x0_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(ca + dm, (x0_cfg - fake) / scale, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# dmd_update_scale
# ------------------------------------------------------------------------------------------------------
def test_dmd_update_scale_hand_value():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    reference = torch.tensor([[0.0, 0.0], [1.0, 6.0]])
    # |x - ref| = [[1, 2], [2, 2]] -> per-sample means [1.5, 2.0]
    scale = dmd_update_scale(x, reference)
    assert scale.shape == (2,)
    assert torch.allclose(scale, torch.tensor([1.5, 2.0]))
    # 4-D: mean over C, H, W per sample
    x4 = torch.zeros(2, 2, 1, 2)
    ref4 = torch.tensor([[[[1.0, -1.0]], [[3.0, -3.0]]], [[[0.5, 0.5]], [[0.5, 0.5]]]])
    assert torch.allclose(dmd_update_scale(x4, ref4), torch.tensor([2.0, 0.5]))


def test_dmd_update_scale_floor_at_eps():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scale = dmd_update_scale(x, x.clone())
    assert torch.allclose(scale, torch.full((2,), 1e-4))
    assert torch.allclose(dmd_update_scale(x, x.clone(), eps=0.5), torch.full((2,), 0.5))
    # a tiny but non-zero difference is floored too
    assert torch.allclose(dmd_update_scale(x, x + 1e-6), torch.full((2,), 1e-4))


def test_dmd_update_scale_nonfinite_becomes_one_per_sample():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    reference = torch.tensor([[float("nan"), 0.0], [1.0, 6.0], [float("inf"), 0.0]])
    scale = dmd_update_scale(x, reference)
    # NaN -> 1, inf -> 1, the finite sample is unaffected (mean(|[2, 2]|) = 2)
    assert torch.allclose(scale, torch.tensor([1.0, 2.0, 1.0]))
    assert torch.all(torch.isfinite(scale))


def test_dmd_update_scale_does_not_backprop_into_x():
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    scale = dmd_update_scale(x, torch.zeros(1, 2))
    assert not scale.requires_grad


# ------------------------------------------------------------------------------------------------------
# normalize_update
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def update_inputs():
    x = torch.zeros(2, 1, 2)
    ca = torch.tensor([[[4.0, -2.0]], [[1.0, 3.0]]])
    dm = torch.tensor([[[8.0, 4.0]], [[-2.0, 6.0]]])
    ca_ref = torch.tensor([[[2.0, -2.0]], [[0.5, 0.5]]])  # per-sample mean |x - ref| = 2, 0.5
    dm_ref = torch.tensor([[[4.0, 4.0]], [[1.0, -3.0]]])  # per-sample mean |x - ref| = 4, 2
    return x, ca, dm, ca_ref, dm_ref


def test_normalize_update_per_term(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    ca_n, dm_n = normalize_update(ca, dm, x, ca_ref, dm_ref, "per_term")
    # sample 0: CA / 2, DM / 4; sample 1: CA / 0.5, DM / 2
    assert torch.allclose(ca_n, torch.tensor([[[2.0, -1.0]], [[2.0, 6.0]]]))
    assert torch.allclose(dm_n, torch.tensor([[[2.0, 1.0]], [[-1.0, 3.0]]]))


def test_normalize_update_per_term_with_one_term_missing(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    ca_n, dm_n = normalize_update(ca, None, x, ca_ref, None, "per_term")
    assert dm_n is None
    assert torch.allclose(ca_n, torch.tensor([[[2.0, -1.0]], [[2.0, 6.0]]]))
    ca_n, dm_n = normalize_update(None, dm, x, None, dm_ref, "per_term")
    assert ca_n is None
    assert torch.allclose(dm_n, torch.tensor([[[2.0, 1.0]], [[-1.0, 3.0]]]))


def test_normalize_update_shared(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    ca_n, dm_n = normalize_update(ca, dm, x, ca_ref, dm_ref, "shared")
    # both terms divided by the CA reference scale: 2 for sample 0, 0.5 for sample 1
    assert torch.allclose(ca_n, torch.tensor([[[2.0, -1.0]], [[2.0, 6.0]]]))
    assert torch.allclose(dm_n, torch.tensor([[[4.0, 2.0]], [[-4.0, 12.0]]]))


def test_normalize_update_shared_with_one_term_missing(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    # no CA term: the DM reference sets the scale (4, 2)
    ca_n, dm_n = normalize_update(None, dm, x, None, dm_ref, "shared")
    assert ca_n is None
    assert torch.allclose(dm_n, torch.tensor([[[2.0, 1.0]], [[-1.0, 3.0]]]))
    # no DM term: the CA reference (2, 0.5)
    ca_n, dm_n = normalize_update(ca, None, x, ca_ref, None, "shared")
    assert dm_n is None
    assert torch.allclose(ca_n, torch.tensor([[[2.0, -1.0]], [[2.0, 6.0]]]))


def test_normalize_update_none_is_identity(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    ca_n, dm_n = normalize_update(ca, dm, x, ca_ref, dm_ref, "none")
    assert ca_n is ca and dm_n is dm
    assert normalize_update(None, dm, x, None, dm_ref, "none") == (None, dm)


def test_normalize_update_unknown_mode_raises(update_inputs):
    x, ca, dm, ca_ref, dm_ref = update_inputs
    with pytest.raises(ValueError):
        normalize_update(ca, dm, x, ca_ref, dm_ref, "global")


# ------------------------------------------------------------------------------------------------------
# proxy_loss
# ------------------------------------------------------------------------------------------------------
def test_proxy_loss_hand_value():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    update = torch.tensor([[2.0, 0.0], [0.0, -2.0]])
    # target = x + 0.5 * update; (x - target)^2 = [1, 0, 0, 1] -> mean 0.5 -> loss 0.25
    assert proxy_loss(x, update, weight=0.5).item() == pytest.approx(0.25)
    # weight 1: squares [4, 0, 0, 4] -> mean 2 -> loss 1
    assert proxy_loss(x, update).item() == pytest.approx(1.0)
    assert proxy_loss(x, torch.zeros_like(x)).item() == 0.0


@pytest.mark.parametrize("weight", [1.0, 0.5, 3.0])
def test_proxy_loss_gradient_is_minus_weight_update_over_numel(weight):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    update = torch.randn(2, 3, 4, 4, generator=generator)
    loss = proxy_loss(x, update, weight)
    loss.backward()
    assert torch.allclose(x.grad, -weight * update / x.numel(), atol=1e-7)
    # loss value: 0.5 * mean((weight * update)^2)
    assert loss.item() == pytest.approx(0.5 * (weight * update).pow(2).mean().item(), rel=1e-5)


def test_proxy_loss_hand_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    update = torch.tensor([[2.0, 0.0], [0.0, -2.0]])
    proxy_loss(x, update, weight=0.5).backward()
    # -0.5 * update / 4
    assert torch.allclose(x.grad, torch.tensor([[-0.25, 0.0], [0.0, 0.25]]))


def test_proxy_loss_half_precision_input_grad_dtype():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, requires_grad=True)
    loss = proxy_loss(x, torch.tensor([[2.0, -2.0]], dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), torch.tensor([[-1.0, 1.0]]))  # -update / 2


# ------------------------------------------------------------------------------------------------------
# generator_step_weights
# ------------------------------------------------------------------------------------------------------
def test_generator_step_weights_hand_values():
    # w(t) = 0.25, 1, 4 (eps: alpha / sigma = 0.5, 1, 2): sqrt / mean(sqrt) = [0.5, 1, 2] / (7 / 6)
    weights = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    assert torch.allclose(generator_step_weights(weights, "prediction"),
                          torch.tensor([3 / 7, 6 / 7, 12 / 7], dtype=torch.float64), atol=1e-12)
    assert torch.equal(generator_step_weights(weights, "x0"), torch.ones(3, dtype=torch.float64))
    # mean 1 whatever the schedule: the overall scale (and so gradient clipping) is unchanged on average
    assert generator_step_weights(torch.tensor([1e-3, 7.0, 50.0]), "prediction").mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="generator_step_weighting"):
        generator_step_weights(weights, "eps")


# ------------------------------------------------------------------------------------------------------
# mean_variance_kl (Eq. 7)
# ------------------------------------------------------------------------------------------------------
def test_mean_variance_kl_hand_value_two_images():
    # image 1: [1, 3, 1, 3] -> mean 2, var 1; image 2: [-2, 2, -2, 2] -> mean 0, var 4
    x = torch.tensor([[1.0, 3.0, 1.0, 3.0], [-2.0, 2.0, -2.0, 2.0]]).reshape(2, 1, 2, 2)
    # target N(0, 2):
    # KL1 = 0.5 * ((1 + 4)/2 - 1 - log(1/2)) = 0.5 * (1.5 + ln 2)
    # KL2 = 0.5 * ((4 + 0)/2 - 1 - log(4/2)) = 0.5 * (1 - ln 2)
    # mean = (2.5 / 2) / 2 = 0.625
    assert mean_variance_kl(x, 0.0, 2.0).item() == pytest.approx(0.625, rel=1e-6)
    # target N(0, 1): KL1 = 0.5 * (5 - 1 - 0) = 2, KL2 = 0.5 * (4 - 1 - ln 4) -> mean
    expected = (2.0 + 0.5 * (3.0 - math.log(4.0))) / 2
    assert mean_variance_kl(x, 0.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_mean_variance_kl_zero_at_target():
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]).reshape(2, 1, 2, 2)  # mean 0.5, var 0.25
    assert mean_variance_kl(x, 0.5, 0.25).item() == pytest.approx(0.0, abs=1e-7)
    assert mean_variance_kl(x, 0.5, 0.3).item() > 0
    assert mean_variance_kl(x, 0.4, 0.25).item() > 0


def test_mean_variance_kl_constant_image_is_finite_and_differentiable():
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    kl = mean_variance_kl(x, 0.0, 1.0)
    assert torch.isfinite(kl)
    kl.backward()
    assert torch.all(torch.isfinite(x.grad))


def test_mean_variance_kl_gradient_pulls_mean_to_target():
    x = torch.tensor([[1.0, 3.0, 1.0, 3.0]], requires_grad=True)  # mean 2, var 1
    mean_variance_kl(x, 0.0, 1.0).backward()
    # d/dx_j of 0.5 * (mu - 0)^2 term = mu / n = 0.5; variance term at var = target: 0.5*(1 - 1/var)*dvar = 0
    assert torch.allclose(x.grad, torch.full((1, 4), 0.5), atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# weighted_denoising_loss
# ------------------------------------------------------------------------------------------------------
def test_weighted_denoising_loss_without_weight():
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # per-sample mean squared error [1, 2] -> 1.5
    assert weighted_denoising_loss(pred, target).item() == pytest.approx(1.5)


def test_weighted_denoising_loss_with_weight():
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # [1, 2] * [3, 0.5] = [3, 1] -> 2
    weight = torch.tensor([3.0, 0.5], dtype=torch.float64)
    loss = weighted_denoising_loss(pred, target, weight)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.0)


def test_weighted_denoising_loss_4d_and_gradient():
    pred = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.ones(2, 1, 2, 2)
    loss = weighted_denoising_loss(pred, target, torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx(1.5)  # per-sample 1 and 1, weighted [1, 2], mean 1.5
    loss.backward()
    # d/dpred of mean_b(w_b * mean_j (p - t)^2) = w_b * 2 (p - t) / (4 * 2)
    assert torch.allclose(pred.grad[0], torch.full((1, 2, 2), -0.25))
    assert torch.allclose(pred.grad[1], torch.full((1, 2, 2), -0.5))


# ------------------------------------------------------------------------------------------------------
# per_image_statistics
# ------------------------------------------------------------------------------------------------------
def test_per_image_statistics_hand_values():
    x = torch.tensor([[1.0, 3.0, 1.0, 3.0], [-2.0, 2.0, -2.0, 2.0]]).reshape(2, 1, 2, 2)
    # means [2, 0] -> 1; population stds [1, 2] -> 1.5, max 2; largest |x| = 3
    stats = per_image_statistics(x)
    assert stats == pytest.approx({"gen_mean": 1.0, "gen_std": 1.5, "gen_std_max": 2.0, "gen_abs_max": 3.0})
    assert all(isinstance(value, float) for value in stats.values())


def test_per_image_statistics_accepts_grad_tensor():
    x = torch.tensor([[-5.0, 1.0]], requires_grad=True)
    stats = per_image_statistics(x)
    # mean -2, std 3, |x| max 5
    assert stats == pytest.approx({"gen_mean": -2.0, "gen_std": 3.0, "gen_std_max": 3.0, "gen_abs_max": 5.0})
