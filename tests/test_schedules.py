"""Noise schedules, re-noising and tau samplers checked against hand-computed values (pure CPU math)."""

import math

import pytest
import torch

from decoupled_dmd.trainer.schedules import (
    PREDICTION_TYPES,
    RENOISE_SCHEDULES,
    DiscreteVPSchedule,
    FlowSchedule,
    append_dims,
    check_student_timesteps,
    learning_rate_factor,
    prediction_to_x0,
    sample_renoise_levels,
    teacher_sampling_levels,
    timestep_level_bounds,
)

T = 1000


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def hand_scaled_linear_alpha_bar(k, total=T, beta_start=0.00085, beta_end=0.012):
    """alpha_bar_k = prod_{i<=k} (1 - beta_i), beta_i = (sqrt(b0) + i/(T-1) * (sqrt(b1) - sqrt(b0)))^2, in plain
    Python."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    product = 1.0
    for i in range(k + 1):
        beta = (lo + (hi - lo) * i / (total - 1)) ** 2
        product *= 1.0 - beta
    return product


@pytest.fixture(scope="module")
def sd():
    return DiscreteVPSchedule.scaled_linear()


@pytest.fixture
def small_vp():
    # T = 4: levels 1, 3/4, 1/2, 1/4 are exact binary fractions.
    # alpha_bar = 0.8, 0.5, 0.2, 0.1 -> k_sigma = sqrt((1-ab)/ab) = 1/2, 1, 2, 3.
    return DiscreteVPSchedule(f64([0.8, 0.5, 0.2, 0.1]))


# ------------------------------------------------------------------------------------------------------
# append_dims
# ------------------------------------------------------------------------------------------------------
def test_append_dims_shapes_and_broadcast():
    values = torch.tensor([2.0, 3.0])
    assert append_dims(values, 1).shape == (2,)
    assert append_dims(values, 4).shape == (2, 1, 1, 1)
    assert append_dims(values, 5).shape == (2, 1, 1, 1, 1)  # video latents (B, C, F, H, W)
    x = torch.ones(2, 3, 2, 2)
    scaled = append_dims(values, x.ndim) * x
    assert torch.all(scaled[0] == 2.0) and torch.all(scaled[1] == 3.0)


def test_append_dims_rejects_more_dims_than_target():
    with pytest.raises(ValueError):
        append_dims(torch.ones(2, 3), 1)


# ------------------------------------------------------------------------------------------------------
# DiscreteVPSchedule
# ------------------------------------------------------------------------------------------------------
def test_scaled_linear_alphas_cumprod_vs_hand_formula(sd):
    assert sd.num_train_timesteps == 1000
    # first timestep: beta_0 = 0.00085 exactly -> alpha_bar_0 = 0.99915
    assert sd.alphas_cumprod[0].item() == pytest.approx(0.99915, rel=1e-12)
    # second: beta_1 = (sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) / 999)^2
    beta_1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    assert sd.alphas_cumprod[1].item() == pytest.approx(0.99915 * (1 - beta_1), rel=1e-12)
    for k in (0, 1, 10, 250, 499, 500, 750, 999):
        assert sd.alphas_cumprod[k].item() == pytest.approx(hand_scaled_linear_alpha_bar(k), rel=1e-9)
    # SD1.5's well-known k-diffusion sigma range: sigma_min ~ 0.0292, sigma_max ~ 14.6146
    assert (math.sqrt((1 - sd.alphas_cumprod[0].item()) / sd.alphas_cumprod[0].item())
            == pytest.approx(0.029167, abs=1e-6))
    assert (math.sqrt((1 - sd.alphas_cumprod[-1].item()) / sd.alphas_cumprod[-1].item())
            == pytest.approx(14.6146, abs=1e-4))


@pytest.mark.parametrize("k", [0, 1, 59, 249, 499, 749, 980, 999])
def test_scaled_linear_alpha_sigma_at_timesteps(sd, k):
    ab = hand_scaled_linear_alpha_bar(k)
    level = f64([1.0 - k / T])
    alpha, sigma = sd.alpha_sigma(level)
    assert alpha.item() == pytest.approx(math.sqrt(ab), rel=1e-9)
    assert sigma.item() == pytest.approx(math.sqrt(1.0 - ab), rel=1e-9)
    assert alpha.item() ** 2 + sigma.item() ** 2 == pytest.approx(1.0, abs=1e-12)
    # the same timestep from inside its level bin (1 - (k+1)/T, 1 - k/T]
    alpha_mid, sigma_mid = sd.alpha_sigma(f64([1.0 - (k + 0.5) / T]))
    assert alpha_mid.item() == pytest.approx(math.sqrt(ab), rel=1e-9)
    assert sigma_mid.item() == pytest.approx(math.sqrt(1.0 - ab), rel=1e-9)
    assert sd.timestep(level).item() == k


def test_level_is_one_minus_k_over_T(sd):
    k = torch.arange(T)
    assert torch.allclose(sd.level(k), 1.0 - k.double() / T, atol=0, rtol=0)
    assert sd.level(0).item() == 1.0
    assert sd.level(500).item() == 0.5
    assert sd.level(999).item() == pytest.approx(0.001, abs=1e-15)


def test_timestep_index_inverts_level_for_every_k(sd):
    k = torch.arange(T)
    assert torch.equal(sd.timestep_index(sd.level(k)), k)
    assert torch.equal(sd.timestep(sd.level(k)), k.double())
    # scalar (python int) path too, the way a student grid is converted
    mismatched = [kk for kk in range(T) if int(sd.timestep_index(sd.level(kk))) != kk]
    assert mismatched == []


def test_cleaner_level_maps_below_k(sd):
    k = torch.arange(1, T)
    # strictly cleaner than level(k) by a margin well above float error: lands on a timestep < k
    for delta in (1e-7, 1e-4, 0.5 / T, 1.0 / T - 1e-7):
        assert torch.all(sd.timestep_index(sd.level(k) + delta) < k), delta
    # exactly one bin cleaner -> k - 1; anywhere inside bin k -> k
    assert torch.equal(sd.timestep_index(sd.level(k) + 1.0 / T), k - 1)
    assert torch.equal(sd.timestep_index(sd.level(k) - 0.5 / T), k)


def test_timestep_index_small_schedule_and_clamping(small_vp):
    # bins for T=4: k=0 (3/4, 1], k=1 (1/2, 3/4], k=2 (1/4, 1/2], k=3 (0, 1/4]
    levels = f64([1.0, 0.9, 0.76, 0.75, 0.7, 0.51, 0.5, 0.3, 0.25, 0.1, 0.0])
    expected = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    assert torch.equal(small_vp.timestep_index(levels), expected)
    # out-of-range levels clamp to valid indices
    assert small_vp.timestep_index(f64([1.5, -0.5])).tolist() == [0, 3]
    assert small_vp.valid_timestep_range() == (0.0, 3.0)


def test_small_schedule_alpha_sigma_and_k_sigma(small_vp):
    levels = f64([1.0, 0.75, 0.5, 0.25])
    alpha, sigma = small_vp.alpha_sigma(levels)
    assert torch.allclose(alpha, f64([0.8, 0.5, 0.2, 0.1]).sqrt())
    assert torch.allclose(sigma, f64([0.2, 0.5, 0.8, 0.9]).sqrt())
    # sqrt(0.2/0.8) = 1/2, sqrt(0.5/0.5) = 1, sqrt(0.8/0.2) = 2, sqrt(0.9/0.1) = 3
    assert torch.allclose(small_vp.k_sigma(levels), f64([0.5, 1.0, 2.0, 3.0]))


def test_from_k_sigmas_round_trip(small_vp):
    # alpha_bar = 1 / (1 + sigma^2): sigma 1/2 -> 0.8, 1 -> 0.5, 2 -> 0.2, 3 -> 0.1
    rebuilt = DiscreteVPSchedule.from_k_sigmas(f64([0.5, 1.0, 2.0, 3.0]))
    assert torch.allclose(rebuilt.alphas_cumprod, f64([0.8, 0.5, 0.2, 0.1]))
    assert rebuilt.num_train_timesteps == 4
    assert torch.allclose(rebuilt.k_sigma(f64([1.0, 0.75, 0.5, 0.25])), small_vp.k_sigma(f64([1.0, 0.75, 0.5, 0.25])))


def test_from_k_sigmas_round_trip_scaled_linear(sd):
    ab = sd.alphas_cumprod
    sigmas = ((1 - ab) / ab).sqrt()
    rebuilt = DiscreteVPSchedule.from_k_sigmas(sigmas)
    assert torch.allclose(rebuilt.alphas_cumprod, ab, rtol=1e-12, atol=0)
    k = torch.arange(T)
    assert torch.allclose(rebuilt.k_sigma(rebuilt.level(k)), sigmas, rtol=1e-12, atol=0)
    assert torch.allclose(rebuilt.k_sigma(rebuilt.level(k) - 0.5 / T), sigmas, rtol=1e-12, atol=0)


def test_k_sigma_vp_hand(sd):
    for k in (0, 499, 999):
        ab = hand_scaled_linear_alpha_bar(k)
        assert sd.k_sigma(f64([1.0 - (k + 0.5) / T])).item() == pytest.approx(math.sqrt((1 - ab) / ab), rel=1e-9)


def test_vp_rejects_bad_alphas_cumprod():
    with pytest.raises(ValueError):
        DiscreteVPSchedule(f64([0.5]))
    with pytest.raises(ValueError):
        DiscreteVPSchedule(f64([1.0, 0.5]))
    with pytest.raises(ValueError):
        DiscreteVPSchedule(f64([0.5, 0.0]))


# ------------------------------------------------------------------------------------------------------
# FlowSchedule
# ------------------------------------------------------------------------------------------------------
def test_flow_coefficients_timestep_and_k_sigma():
    flow = FlowSchedule(1000)
    levels = f64([0.0, 0.25, 0.5, 0.9, 1.0])
    alpha, sigma = flow.alpha_sigma(levels)
    assert torch.allclose(alpha, levels)
    assert torch.allclose(sigma, f64([1.0, 0.75, 0.5, 0.1, 0.0]))
    assert torch.allclose(flow.timestep(levels), f64([1000.0, 750.0, 500.0, 100.0, 0.0]))
    assert torch.allclose(flow.level(f64([1000.0, 750.0, 500.0, 100.0, 0.0])), levels)
    assert flow.level(250).item() == 0.75
    # ComfyUI CONST sampling: k_sigma is the noise fraction 1 - t (not sigma/alpha)
    assert torch.allclose(flow.k_sigma(levels), f64([1.0, 0.75, 0.5, 0.1, 0.0]))
    assert flow.valid_timestep_range() == (0.0, 1000.0)


# ------------------------------------------------------------------------------------------------------
# renoise, prediction_to_x0, denoising_loss_weight
# ------------------------------------------------------------------------------------------------------
def test_renoise_flow_hand_values():
    flow = FlowSchedule()
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[-1.0, 0.0], [2.0, -2.0]])
    # sample 0 at t=0.25: 0.25*x0 + 0.75*noise; sample 1 at t=0.5: 0.5*x0 + 0.5*noise
    out = flow.renoise(x0, noise, f64([0.25, 0.5]))
    expected = torch.tensor([[0.25 - 0.75, 0.5], [1.5 + 1.0, 2.0 - 1.0]])
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected)


def test_renoise_vp_hand_values_4d(small_vp):
    x0 = torch.full((2, 1, 2, 2), 2.0)
    noise = torch.full((2, 1, 2, 2), -1.0)
    # level 0.75 -> ab 0.5: sqrt(.5)*2 - sqrt(.5); level 0.25 -> ab 0.1: sqrt(.1)*2 - sqrt(.9)
    out = small_vp.renoise(x0, noise, f64([0.75, 0.25]))
    assert out.shape == (2, 1, 2, 2)
    assert torch.allclose(out[0], torch.full((1, 2, 2), 2 * math.sqrt(0.5) - math.sqrt(0.5)))
    assert torch.allclose(out[1], torch.full((1, 2, 2), 2 * math.sqrt(0.1) - math.sqrt(0.9)))


def _vp_setup(sd):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    levels = f64([0.05, 0.5, 0.95])
    alpha, sigma = sd.alpha_sigma(levels)
    return x0, noise, levels, alpha, sigma, generator


def test_prediction_to_x0_epsilon(sd):
    x0, noise, levels, alpha, sigma, _ = _vp_setup(sd)
    x_t = sd.renoise(x0, noise, levels)
    assert torch.allclose(prediction_to_x0(x_t, noise, alpha, sigma, "epsilon"), x0, atol=1e-9)


def test_prediction_to_x0_v_prediction(sd):
    x0, noise, levels, alpha, sigma, _ = _vp_setup(sd)
    x_t = sd.renoise(x0, noise, levels)
    a, s = append_dims(alpha, 4), append_dims(sigma, 4)
    v = a * noise - s * x0
    assert torch.allclose(prediction_to_x0(x_t, v, alpha, sigma, "v_prediction"), x0, atol=1e-9)


def test_prediction_to_x0_flow():
    flow = FlowSchedule()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    levels = f64([0.1, 0.5, 0.8])
    alpha, sigma = flow.alpha_sigma(levels)
    x_t = flow.renoise(x0, noise, levels)
    velocity = noise - x0
    assert torch.allclose(prediction_to_x0(x_t, velocity, alpha, sigma, "flow"), x0, atol=1e-12)


def test_prediction_to_x0_hand_values():
    x_t = torch.tensor([[1.0, 2.0]])
    prediction = torch.tensor([[0.5, -1.0]])
    alpha, sigma = f64([0.6]), f64([0.8])  # 0.36 + 0.64 = 1
    # eps: (x_t - 0.8 p) / 0.6
    assert torch.allclose(prediction_to_x0(x_t, prediction, alpha, sigma, "epsilon"),
                          torch.tensor([[(1.0 - 0.4) / 0.6, (2.0 + 0.8) / 0.6]]))
    # v: 0.6 x_t - 0.8 p
    assert torch.allclose(prediction_to_x0(x_t, prediction, alpha, sigma, "v_prediction"),
                          torch.tensor([[0.6 - 0.4, 1.2 + 0.8]]))
    # flow: x_t - 0.8 p
    assert torch.allclose(prediction_to_x0(x_t, prediction, alpha, sigma, "flow"),
                          torch.tensor([[1.0 - 0.4, 2.0 + 0.8]]))
    with pytest.raises(ValueError):
        prediction_to_x0(x_t, prediction, alpha, sigma, "sample")


def _native_identity(schedule, levels, prediction_type, native_target_fn):
    generator = torch.Generator().manual_seed(7)
    shape = (levels.numel(), 3, 4, 4)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(levels)
    x_t = schedule.renoise(x0, noise, levels)
    target = native_target_fn(x0, noise, append_dims(alpha, 4), append_dims(sigma, 4))
    prediction = torch.randn(shape, generator=generator, dtype=torch.float64)
    x0_pred = prediction_to_x0(x_t, prediction, alpha, sigma, prediction_type)
    native = (prediction - target).pow(2).flatten(1).sum(1)
    in_x0 = (x0_pred - x0).pow(2).flatten(1).sum(1)
    weight = schedule.denoising_loss_weight(levels, prediction_type)
    assert torch.allclose(native, weight * in_x0, rtol=1e-9)


def test_denoising_loss_weight_identity_epsilon(sd):
    _native_identity(sd, f64([0.05, 0.3, 0.7, 0.95]), "epsilon", lambda x0, n, a, s: n)


def test_denoising_loss_weight_identity_v(sd):
    _native_identity(sd, f64([0.05, 0.3, 0.7, 0.95]), "v_prediction", lambda x0, n, a, s: a * n - s * x0)


def test_denoising_loss_weight_identity_flow():
    _native_identity(FlowSchedule(), f64([0.05, 0.3, 0.7, 0.95]), "flow", lambda x0, n, a, s: n - x0)


def test_denoising_loss_weight_hand_values(small_vp):
    # level 0.5 -> ab 0.2: eps weight = SNR = 0.2/0.8 = 1/4; v weight = 1/sigma^2 = 1/0.8
    level = f64([0.5])
    assert small_vp.denoising_loss_weight(level, "epsilon").item() == pytest.approx(0.25)
    assert small_vp.denoising_loss_weight(level, "v_prediction").item() == pytest.approx(1.25)
    # flow at t=0.25: sigma = 0.75 -> 1/0.5625 = 16/9
    assert FlowSchedule().denoising_loss_weight(f64([0.25]), "flow").item() == pytest.approx(16 / 9)
    with pytest.raises(ValueError):
        small_vp.denoising_loss_weight(level, "x0")
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "flow"}


# ------------------------------------------------------------------------------------------------------
# timestep_level_bounds
# ------------------------------------------------------------------------------------------------------
def test_timestep_level_bounds_values(sd):
    # DDPM: bins min..max inclusive -> (1 - 981/1000, 1 - 20/1000] = (0.019, 0.98]
    lo, hi = timestep_level_bounds(sd, 20, 980)
    assert lo == pytest.approx(0.019, abs=1e-15) and hi == pytest.approx(0.98, abs=1e-15)
    # flow: continuous timesteps (1 - 980/1000, 1 - 20/1000] = (0.02, 0.98]
    lo, hi = timestep_level_bounds(FlowSchedule(), 20, 980)
    assert lo == pytest.approx(0.02, abs=1e-15) and hi == pytest.approx(0.98, abs=1e-15)
    for bad in ((-1, 980), (500, 500), (600, 500)):
        with pytest.raises(ValueError):
            timestep_level_bounds(sd, *bad)


def test_timestep_level_bounds_ddpm_samples_cover_exactly_20_to_980(sd):
    bounds = timestep_level_bounds(sd, 20, 980)
    generator = torch.Generator().manual_seed(123)
    student = torch.zeros(200_000, dtype=torch.float64)  # student at pure noise: no constraint
    tau, _ = sample_renoise_levels("decoupled-full", student, bounds, generator)
    timesteps = sd.timestep(tau)
    assert timesteps.min().item() == 20.0
    assert timesteps.max().item() == 980.0
    assert torch.unique(timesteps).numel() == 961  # every timestep 20..980 is reachable


def test_timestep_level_bounds_flow_samples_within_range():
    flow = FlowSchedule()
    bounds = timestep_level_bounds(flow, 20, 980)
    tau, _ = sample_renoise_levels("decoupled-full", torch.zeros(50_000, dtype=torch.float64), bounds,
                                   torch.Generator().manual_seed(5))
    timesteps = flow.timestep(tau)
    assert timesteps.min().item() >= 20.0 - 1e-9 and timesteps.max().item() < 980.0
    assert timesteps.min().item() < 21.0 and timesteps.max().item() > 979.0


# ------------------------------------------------------------------------------------------------------
# sample_renoise_levels
# ------------------------------------------------------------------------------------------------------
BOUNDS = (0.019, 0.98)  # DDPM 20..980
N = 20_000


@pytest.fixture
def student_levels(sd):
    # per-sample student levels: the default 4-step grid 999, 749, 499, 249 cycled over the batch
    grid = sd.level(torch.tensor([999, 749, 499, 249]))
    return grid.repeat(N // 4)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_coupled_shared_uses_one_tau(student_levels):
    tau_ca, tau_dm = sample_renoise_levels("coupled-shared", student_levels, BOUNDS, _gen())
    assert torch.equal(tau_ca, tau_dm)
    assert tau_ca.data_ptr() != tau_dm.data_ptr()  # a copy, not the same storage
    assert tau_ca.dtype == torch.float64 and tau_ca.shape == student_levels.shape
    assert torch.all(tau_ca > BOUNDS[0]) and torch.all(tau_ca <= BOUNDS[1])
    # ignores the student level: some taus below (noisier than) the student step
    assert torch.any(tau_ca < student_levels)


def test_decoupled_full_independent_and_within_bounds(student_levels):
    tau_ca, tau_dm = sample_renoise_levels("decoupled-full", student_levels, BOUNDS, _gen())
    for tau in (tau_ca, tau_dm):
        assert torch.all(tau > BOUNDS[0]) and torch.all(tau <= BOUNDS[1])
        assert torch.any(tau < student_levels)
        # roughly uniform on (0.019, 0.98]: mean ~ 0.4995
        assert tau.mean().item() == pytest.approx((BOUNDS[0] + BOUNDS[1]) / 2, abs=0.01)
    assert not torch.equal(tau_ca, tau_dm)
    correlation = torch.corrcoef(torch.stack([tau_ca, tau_dm]))[0, 1].item()
    assert abs(correlation) < 0.05


def test_decoupled_constrained_both_above_student(student_levels):
    tau_ca, tau_dm = sample_renoise_levels("decoupled-constrained", student_levels, BOUNDS, _gen())
    for tau in (tau_ca, tau_dm):
        assert torch.all(tau > student_levels)
        assert torch.all(tau > BOUNDS[0]) and torch.all(tau <= BOUNDS[1])
    assert not torch.equal(tau_ca, tau_dm)
    # student at timestep 249 (level 0.751): tau ~ U(0.751, 0.98], mean ~ 0.8655
    mask = student_levels == student_levels[3]
    assert tau_ca[mask].mean().item() == pytest.approx((0.751 + 0.98) / 2, abs=0.01)


def test_decoupled_hybrid_ca_constrained_dm_full(student_levels, sd):
    tau_ca, tau_dm = sample_renoise_levels("decoupled-hybrid", student_levels, BOUNDS, _gen())
    assert torch.all(tau_ca > student_levels)
    assert torch.all(tau_ca <= BOUNDS[1])
    assert torch.all(tau_dm > BOUNDS[0]) and torch.all(tau_dm <= BOUNDS[1])
    # DM spans the full range regardless of the student level: some below it, for every student step
    for step in range(1, 4):  # timesteps 749, 499, 249 (999 is already at the noisy end of the range)
        mask = student_levels == student_levels[step]
        assert torch.any(tau_dm[mask] < student_levels[step])
        assert tau_dm[mask].min().item() < BOUNDS[0] + 0.01
        assert tau_dm[mask].max().item() > BOUNDS[1] - 0.01
    # CA respects the constrained timesteps: strictly below the student's timestep
    student_t = sd.timestep(student_levels)
    assert torch.all(sd.timestep(tau_ca) < student_t)


def test_constrained_low_is_clamped_to_lower_bound():
    # a student level noisier than lo (e.g. timestep 999 -> 0.001) is clamped to lo = 0.019
    student = torch.full((10_000,), 0.001, dtype=torch.float64)
    tau_ca, tau_dm = sample_renoise_levels("decoupled-constrained", student, BOUNDS, _gen(3))
    assert torch.all(tau_ca > BOUNDS[0]) and torch.all(tau_dm > BOUNDS[0])


def test_per_sample_student_levels_hand_ranges():
    student = f64([0.2, 0.9, 0.5])
    lo, hi = 0.1, 0.95
    for seed in range(50):
        tau_ca, tau_dm = sample_renoise_levels("decoupled-constrained", student, (lo, hi), _gen(seed))
        assert 0.2 < tau_ca[0] <= hi and 0.9 < tau_ca[1] <= hi and 0.5 < tau_ca[2] <= hi
        assert 0.2 < tau_dm[0] <= hi and 0.9 < tau_dm[1] <= hi and 0.5 < tau_dm[2] <= hi


def test_uniform_sampling_formula_with_known_generator_draw():
    # tau = hi - (hi - lo) * u with u the generator's float64 uniform draw
    student = f64([0.2, 0.9, 0.5])
    lo, hi = 0.1, 0.95
    u = torch.rand(3, generator=_gen(11), dtype=torch.float64)
    tau_ca, tau_dm = sample_renoise_levels("coupled-shared", student, (lo, hi), _gen(11))
    assert torch.allclose(tau_ca, hi - (hi - lo) * u)
    draws = torch.rand(6, generator=_gen(11), dtype=torch.float64)
    tau_ca, tau_dm = sample_renoise_levels("decoupled-hybrid", student, (lo, hi), _gen(11))
    low_ca = torch.clamp(student, min=lo)
    assert torch.allclose(tau_ca, hi - (hi - low_ca) * draws[:3])
    assert torch.allclose(tau_dm, hi - (hi - lo) * draws[3:])


@pytest.mark.parametrize("name", RENOISE_SCHEDULES)
def test_sampling_is_deterministic_with_seeded_generator(name, student_levels):
    first = sample_renoise_levels(name, student_levels[:64], BOUNDS, _gen(42))
    second = sample_renoise_levels(name, student_levels[:64], BOUNDS, _gen(42))
    other = sample_renoise_levels(name, student_levels[:64], BOUNDS, _gen(43))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_unknown_schedule_raises(student_levels):
    with pytest.raises(ValueError):
        sample_renoise_levels("coupled-hybrid", student_levels, BOUNDS, _gen())


# ------------------------------------------------------------------------------------------------------
# teacher_sampling_levels
# ------------------------------------------------------------------------------------------------------
def test_teacher_sampling_levels_vp(sd, small_vp):
    # start = level(999) = 0.001; then 0.001 + 0.999 * i / 4
    assert teacher_sampling_levels(sd, 4) == pytest.approx([0.001, 0.25075, 0.5005, 0.75025, 1.0], abs=1e-12)
    # T=4: start = level(3) = 0.25 -> 0.25, 0.5, 0.75, then 1.0
    assert teacher_sampling_levels(small_vp, 3) == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)
    assert teacher_sampling_levels(sd, 1) == pytest.approx([0.001, 1.0], abs=1e-12)
    levels = teacher_sampling_levels(sd, 25)
    assert len(levels) == 26 and levels[-1] == 1.0
    assert all(b > a for a, b in zip(levels, levels[1:]))
    # every teacher level maps onto a valid timestep, the first onto the noisiest one
    assert sd.timestep(f64(levels[:1])).item() == 999


def test_teacher_sampling_levels_flow_and_errors():
    assert teacher_sampling_levels(FlowSchedule(), 2) == pytest.approx([0.0, 0.5, 1.0])
    assert teacher_sampling_levels(FlowSchedule(), 4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        teacher_sampling_levels(FlowSchedule(), 0)


# ------------------------------------------------------------------------------------------------------
# check_student_timesteps
# ------------------------------------------------------------------------------------------------------
def test_check_student_timesteps_accepts_valid_grids(sd):
    check_student_timesteps(sd, [999, 749, 499, 249], 20)
    check_student_timesteps(sd, [999], 20)
    check_student_timesteps(sd, [999, 21], 20)
    check_student_timesteps(FlowSchedule(), [1000.0, 750.0, 500.0, 250.0], 20)  # flow allows T itself


@pytest.mark.parametrize("timesteps", [[749, 999], [999, 999, 499], [999, 499, 749]])
def test_check_student_timesteps_not_decreasing(sd, timesteps):
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_student_timesteps(sd, timesteps, 20)


@pytest.mark.parametrize("timesteps", [[1000, 500], [999, 500, -1], [1500]])
def test_check_student_timesteps_out_of_range(sd, timesteps):
    with pytest.raises(ValueError, match="outside"):
        check_student_timesteps(sd, timesteps, 20)


def test_check_student_timesteps_flow_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        check_student_timesteps(FlowSchedule(), [1000.5, 500.0], 20)


@pytest.mark.parametrize("timesteps", [[999, 20], [999, 500, 10]])
def test_check_student_timesteps_last_not_above_min(sd, timesteps):
    with pytest.raises(ValueError, match="min_timestep"):
        check_student_timesteps(sd, timesteps, 20)


def test_check_student_timesteps_empty_and_nan(sd):
    with pytest.raises(ValueError, match="empty"):
        check_student_timesteps(sd, [], 20)
    with pytest.raises(ValueError):
        check_student_timesteps(sd, [999.0, float("nan")], 20)
    with pytest.raises(ValueError):
        check_student_timesteps(sd, [float("nan")], 20)


def test_parse_student_timesteps_is_the_one_reader_of_a_written_grid():
    from decoupled_dmd.trainer.schedules import parse_student_timesteps

    assert parse_student_timesteps("999, 749;499,249") == [999, 749, 499, 249]
    assert parse_student_timesteps([999, 499.0]) == [999, 499]
    for bad, words in (("999,abc", "whole numbers"), ([999, 499.5], "whole numbers"), ([True], "whole numbers"),
                       ("", "strictly decreasing"), ("249,999", "strictly decreasing"), ("999,999", "strictly"),
                       ([999, -1], "non-negative"), ("999,,499", "empty entry"), (",999", "empty entry")):
        with pytest.raises(ValueError, match=words):
            parse_student_timesteps(bad, "timesteps")
    assert parse_student_timesteps([5, -3], minimum=None) == [5, -3]
    assert parse_student_timesteps("[999, 499]") == parse_student_timesteps("999,499,") == [999, 499]


# --- timestep shift (flow teachers: SD3, Flux, Lumina, Z-Image) -------------------------------------------------
def test_shift_level_by_hand():
    from decoupled_dmd.trainer.schedules import shift_level, unshift_level

    level = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)
    # sigma = 1 - level; shift 3: 3 s / (1 + 2 s): 1 -> 1, 0.5 -> 0.75, 0.25 -> 0.5, 0 -> 0
    assert torch.allclose(shift_level(level, 3.0), torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(unshift_level(shift_level(level, 3.0), 3.0), level)
    assert shift_level(level, 1.0) is level and unshift_level(level, 1.0) is level


def test_shifted_renoise_levels_are_uniform_before_the_shift_by_hand():
    from decoupled_dmd.trainer.schedules import sample_renoise_levels

    t = torch.tensor([0.5, 0.25], dtype=torch.float64)  # shifted student levels (pre-shift 0.75 and 0.5)
    lo, hi = 0.02, 0.98
    tau_ca, tau_dm = sample_renoise_levels("decoupled-hybrid", t, (lo, hi), torch.Generator().manual_seed(4), 3.0)
    unit = torch.Generator().manual_seed(4)
    u_ca = torch.rand(2, generator=unit, dtype=torch.float64)
    u_dm = torch.rand(2, generator=unit, dtype=torch.float64)

    def pre(level):  # s = s' / (3 - 2 s') on s' = 1 - level
        return 1.0 - (1.0 - level) / (3.0 - 2.0 * (1.0 - level))

    def post(level):
        return 1.0 - 3.0 * (1.0 - level) / (1.0 + 2.0 * (1.0 - level))

    low_ca = torch.tensor([0.75, 0.5], dtype=torch.float64)  # max(t_pre, lo_pre)
    assert torch.allclose(pre(t), low_ca)
    want_ca = post(pre(hi) - (pre(hi) - low_ca) * u_ca)
    want_dm = post(pre(hi) - (pre(hi) - pre(torch.tensor(lo, dtype=torch.float64))) * u_dm)
    assert torch.allclose(tau_ca, want_ca) and torch.allclose(tau_dm, want_dm)
    assert (tau_ca > t).all() and (tau_dm > lo).all() and (tau_dm <= hi).all()
    # the shift spends more of the draws at noisy levels than uniform sampling does
    many = torch.full((20000,), 0.0, dtype=torch.float64)
    shifted = sample_renoise_levels("decoupled-hybrid", many, (lo, hi), torch.Generator().manual_seed(1), 3.0)[1]
    plain = sample_renoise_levels("decoupled-hybrid", many, (lo, hi), torch.Generator().manual_seed(1))[1]
    assert shifted.mean() < plain.mean() - 0.1


def test_timestep_shift_is_refused_for_sd_teachers():
    from decoupled_dmd.trainer.config import ConfigError, checked_timestep_bounds, config_from_dict
    from decoupled_dmd.trainer.schedules import DiscreteVPSchedule, FlowSchedule

    config = config_from_dict({"pretrained_model_name_or_path": "x", "timestep_shift": 3.0,
                               "student_timesteps": [999, 900, 750, 500]})
    assert checked_timestep_bounds(config, FlowSchedule()) == pytest.approx((0.02, 0.98))
    with pytest.raises(ConfigError, match="timestep_shift: 3 is for flow-matching teachers"):
        checked_timestep_bounds(config, DiscreteVPSchedule.scaled_linear())
    with pytest.raises(ConfigError, match="timestep_shift"):
        config_from_dict({"pretrained_model_name_or_path": "x", "timestep_shift": 0.0})


def test_learning_rate_factor_by_hand():
    # constant: warm-up (step + 1) / warmup, then 1
    assert [learning_rate_factor(k, "constant", warmup=4) for k in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # linear over total 10 after warm-up 2: (10 - k) / 8 from k = 2 on, 0 from k = 10
    assert [learning_rate_factor(k, "linear", warmup=2, total=10) for k in (0, 1, 2, 6, 9, 10, 12)] == \
        [0.5, 1.0, 1.0, 0.5, 0.125, 0.0, 0.0]
    # cosine without warm-up over 4: 0.5 * (1 + cos(pi * k / 4))
    expected = [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]
    assert [learning_rate_factor(k, "cosine", total=4) for k in range(5)] == pytest.approx(expected, abs=1e-12)
    assert learning_rate_factor(3, "cosine", warmup=5, total=5) == 0.8  # nothing left to decay over: warm-up only
    assert learning_rate_factor(7, "cosine", warmup=5, total=5) == 1.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        learning_rate_factor(0, "exponential")


def test_the_prediction_type_is_an_object_the_adapters_own():
    """Issue 31: above the denoiser contract nothing switches on the prediction type's name; the adapters hand
    out a `Prediction` whose x0 and loss weight are the by-hand formulas above."""
    from decoupled_dmd.trainer.schedules import PREDICTIONS, EpsilonPrediction, get_prediction

    assert set(PREDICTIONS) == set(PREDICTION_TYPES)
    assert isinstance(get_prediction("epsilon"), EpsilonPrediction)
    assert get_prediction(PREDICTIONS["flow"]).name == "flow"
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        get_prediction("x0")
    alpha, sigma = f64([0.6]), f64([0.8])
    assert torch.allclose(PREDICTIONS["epsilon"].loss_weight(alpha, sigma), f64([0.5625]))
    assert torch.allclose(PREDICTIONS["v_prediction"].loss_weight(alpha, sigma), f64([1.5625]))
