"""Cost accounting, the waste cuts (same math where they claim it), and the memory plan."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPTS, make_trainer

from decoupled_dmd.research.cost import two_teacher_calls
from decoupled_dmd.trainer.accounting import CostMeter, expected_forward_equivalents
from decoupled_dmd.trainer.api import distill, plan_memory
from decoupled_dmd.trainer.config import config_from_dict
from decoupled_dmd.trainer.loop import list_states
from decoupled_dmd.trainer.losses import normalize_update
from decoupled_dmd.trainer.memory_plan import (
    GIB,
    MemoryPlanError,
    build_plan,
    optimizer_state_bytes,
    simulate_peak_bytes,
)


# --- accounting ------------------------------------------------------------------------------------------------
def test_expected_forward_equivalents_by_hand():
    # 4 student steps: a simulation costs (0+1+2+3)/4 = 1.5 forwards; a trained forward 1 + 2 (+1 recompute)
    plain = expected_forward_equivalents(4, 5)
    assert plain == {"student": 1.5 + 3 + 5 * (1.5 + 1), "teacher": 3.0, "fake": 1 + 5 * 3, "total": 36.0}
    checkpointed = expected_forward_equivalents(4, 5, gradient_checkpointing=True)
    assert checkpointed == {"student": 18.0, "teacher": 3.0, "fake": 21.0, "total": 42.0}
    # original DMD: the CA cond prediction is the DM real prediction
    assert expected_forward_equivalents(4, 5, shared_levels=True)["teacher"] == 2.0
    assert expected_forward_equivalents(4, 5, dm_cfg_reference=True)["teacher"] == 4.0
    assert expected_forward_equivalents(4, 5, shared_levels=True, dm_cfg_reference=True)["teacher"] == 2.0
    # DMD2's sharing: the first fake update needs no simulation and no student forward
    assert expected_forward_equivalents(4, 5, share_generator_sample=True)["student"] == 1.5 + 3 + 4 * 2.5
    assert expected_forward_equivalents(1, 2, distribution_matching=False) == {
        "student": 3.0, "teacher": 2.0, "fake": 0.0, "total": 5.0}


def test_cost_meter_counts_rows_per_batch_and_backward():
    meter = CostMeter(batch_size=2, gradient_checkpointing=True)
    meter.forward("teacher", 6)
    meter.forward("fake", 2, "train_forward")
    meter.backward("fake")
    assert meter.by_role() == {"student": 0.0, "teacher": 3.0, "fake": 1 + 2 + 1, "total": 7.0}
    assert meter.logs()["fe_fake_recompute"] == 1.0


def test_trainer_counts_what_algorithm_1_implies(tiny_model_dir, tmp_path):
    # one student step: no backward simulation, so the count of one update is exact
    trainer = make_trainer(tiny_model_dir, tmp_path, student_timesteps=[999])
    logs = trainer.train_step()
    expected = expected_forward_equivalents(1, 2)
    assert {k: logs[f"fe_{k}"] for k in expected} == expected
    assert logs["fe_teacher_forward"] == 3.0  # CA cond + uncond + DM cond, in one call
    assert all(logs[f"seconds_{p}"] > 0 for p in ("fake_sample", "fake_update", "generator_teacher_fake"))


# --- the waste cuts ----------------------------------------------------------------------------------------------
def test_one_batched_teacher_call_gives_the_two_call_update(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.conditioning(PROMPTS[:2])
    tau_ca = torch.tensor([0.4, 0.7], dtype=torch.float64)
    tau_dm = torch.tensor([0.2, 0.9], dtype=torch.float64)
    results = []
    for method in (trainer.method, two_teacher_calls(trainer)):
        trainer.random.generator.manual_seed(7)
        trainer.meter.reset()
        with torch.no_grad():
            results.append(method.update_terms(x, cond, tau_ca, tau_dm))
        assert trainer.meter.logs()["fe_teacher_forward"] == 3.0
    for name in ("delta_ca", "delta_dm", "x0_cfg", "x0_real_dm"):
        # float tolerance: a batch of 6 rows may take other kernels than batches of 4 and 2
        torch.testing.assert_close(getattr(results[0], name), getattr(results[1], name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, rows", [
    ({}, 3), (dict(update_normalization="per_term_cfg"), 4), (dict(renoise_schedule="coupled-shared"), 2),
    (dict(renoise_schedule="coupled-shared", update_normalization="per_term_cfg"), 2),
    (dict(cfg_augmentation=False), 1), (dict(cfg_augmentation=False, update_normalization="per_term_cfg"), 2),
    (dict(regularizer="none"), 2),
])
def test_the_memory_plan_and_the_update_read_one_teacher_row_plan(tiny_model_dir, tmp_path, overrides, rows):
    from decoupled_dmd.trainer.memory_plan import widest_no_grad_rows

    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    assert trainer.method.rows.count == widest_no_grad_rows(trainer.config) == rows
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    tau = torch.tensor([0.4, 0.7], dtype=torch.float64)
    trainer.meter.reset()
    with torch.no_grad():
        trainer.method.update_terms(x, trainer.conditioning(PROMPTS[:2]), tau, tau)
    assert trainer.meter.logs()["fe_teacher_forward"] == rows  # rows per sample actually sent to the teacher


def test_per_term_cfg_normalises_dm_by_dmd2s_scale_at_its_own_level(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, update_normalization="per_term_cfg", guidance_scale=4.0)
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.conditioning(PROMPTS[:2])
    tau_ca = torch.tensor([0.4, 0.7], dtype=torch.float64)
    tau_dm = torch.tensor([0.2, 0.9], dtype=torch.float64)
    trainer.random.generator.manual_seed(7)
    trainer.meter.reset()
    with torch.no_grad():
        terms = trainer.method.update_terms(x, cond, tau_ca, tau_dm)
    assert trainer.meter.logs()["fe_teacher_forward"] == 4.0  # one unconditional call more, at tau_DM
    # by hand: the same re-noised x_dm (the second draw after the seed), the teacher's two predictions there
    trainer.random.generator.manual_seed(7)
    for _ in range(2):
        x_dm = trainer.adapter.schedule.renoise(x, trainer.randn(2), tau_dm)
    with torch.no_grad():
        cond_dm = trainer.x0("teacher", x_dm, tau_dm, cond)
        uncond_dm = trainer.x0("teacher", x_dm, tau_dm, trainer.uncond(2))
    torch.testing.assert_close(terms.x0_dm_reference, uncond_dm + 4.0 * (cond_dm - uncond_dm), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(terms.x0_dm_reference, terms.x0_real_dm)  # per_term's reference is cond alone


def test_per_term_cfg_with_coupled_levels_is_dmd2s_shared_normaliser_bit_for_bit(tiny_model_dir, tmp_path):
    tau = torch.tensor([0.4, 0.7], dtype=torch.float64)
    updates = {}
    for mode in ("per_term_cfg", "shared"):
        trainer = make_trainer(tiny_model_dir, tmp_path / mode, renoise_schedule="coupled-shared",
                               update_normalization=mode)
        x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
        cond = trainer.conditioning(PROMPTS[:2])
        trainer.random.generator.manual_seed(7)
        trainer.meter.reset()
        with torch.no_grad():
            terms = trainer.method.update_terms(x, cond, tau, tau)
        assert trainer.meter.logs()["fe_teacher_forward"] == 2.0  # the shared sample needs no extra call
        updates[mode] = normalize_update(terms.delta_ca, terms.delta_dm, x, terms.x0_cfg, terms.x0_dm_reference, mode)
    for got, want in zip(updates["per_term_cfg"], updates["shared"]):
        assert torch.equal(got, want)


def test_fast_role_switch_is_the_public_peft_switch(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_train_steps=1)
    trainer.train_step()  # student and fake adapters now differ from zero and from each other
    x, level = torch.randn(2, *trainer.latent_shape), torch.tensor([0.3, 0.8], dtype=torch.float64)
    cond = trainer.conditioning(PROMPTS[:2])
    outputs = {}
    for fast in (True, False):
        trainer.roles.use_fast_switch(fast)
        for role in ("student", "teacher", "fake", "student"):
            trainer.roles._active = None  # force the switch, through the path under test
            with torch.no_grad():
                outputs[fast, role] = trainer.x0(role, x, level, cond)
    for role in ("student", "teacher", "fake"):
        assert torch.equal(outputs[True, role], outputs[False, role]), role
    assert not torch.equal(outputs[True, "student"], outputs[True, "fake"])
    assert all(p.requires_grad for role in ("student", "fake") for p in trainer.roles.trainable_parameters(role))


def test_batched_fake_samples_equal_one_by_one_for_a_one_step_student(tiny_model_dir, tmp_path):
    # with one student step there is no re-noising inside the simulation: both ways draw the same prompts and
    # noise in the same order, so the samples must agree (float tolerance: one batch of 6 rows vs 3 of 2, whose
    # convolutions may take other kernels: 1.4e-5 apart at one thread; a wrong draw order is O(1) apart)
    trainer = make_trainer(tiny_model_dir, tmp_path, student_timesteps=[999], fake_updates_per_step=3)
    trainer.random.generator.manual_seed(11)
    with torch.no_grad():
        batched = trainer.method.batched_student_samples(3)
    trainer.random.generator.manual_seed(11)
    one_by_one = []
    for _ in range(3):
        cond, step, noise = trainer.draw_batch()
        with torch.no_grad():
            level = trainer.level(trainer.levels[step], noise.shape[0])
            one_by_one.append((cond, trainer.x0("student", noise, level, cond).float()))
    for (cond_a, x_a), (cond_b, x_b) in zip(batched, one_by_one, strict=True):
        assert torch.equal(cond_a["encoder_hidden_states"], cond_b["encoder_hidden_states"])
        torch.testing.assert_close(x_a, x_b, rtol=1e-4, atol=1e-4)


def test_batched_fake_samples_cost_one_call_per_step_and_the_same_work(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, fake_updates_per_step=4, batch_fake_samples=True)
    trainer.random.generator.manual_seed(5)
    state = trainer.random.generator.get_state()
    steps = []
    for _ in range(4):  # the step indices the batched draw will see (prompts, step, noise per draw)
        steps.append(trainer.draw_batch()[1])
    trainer.random.generator.set_state(state)
    calls = []
    original = trainer.x0
    trainer.x0 = lambda *a, **k: calls.append(a[1].shape[0]) or original(*a, **k)
    trainer.meter.reset()
    with torch.no_grad():
        samples = trainer.method.batched_student_samples(4)
    assert len(samples) == 4 and all(x.shape == (2, *trainer.latent_shape) for _, x in samples)
    assert all(torch.isfinite(x).all() for _, x in samples)
    assert len(calls) == max(steps) + 1  # one call per student step, not one per sample and step
    # the same student work as one by one: each sample runs its own k + 1 student forwards
    assert trainer.meter.by_role()["student"] == sum(k + 1 for k in steps)


def test_sharing_the_generator_sample_saves_a_fresh_student_sample(tiny_model_dir, tmp_path):
    counts = {}
    for share in (False, True):
        trainer = make_trainer(tiny_model_dir, tmp_path / str(share), student_timesteps=[999],
                               share_generator_sample=share)
        counts[share] = trainer.train_step()["fe_student"]
    assert counts == {False: 3 + 2, True: 3 + 1}  # trained forward + one forward per fresh fake sample


@pytest.mark.parametrize("options", [dict(share_generator_sample=True),
                                     dict(batch_fake_samples=True, share_generator_sample=True)])
def test_speed_options_train_and_resume_bit_for_bit(tiny_model_dir, tmp_path, options):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", max_train_steps=3, **options)
    straight.train()
    first = make_trainer(tiny_model_dir, tmp_path / "b", max_train_steps=2, **options)
    first.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "c", max_train_steps=3,
                           resume=list_states(str(tmp_path / "b" / "out"))[-1], **options)
    resumed.train()
    for role in ("student", "fake"):
        expected, actual = straight.roles.trainable_state_dict(role), resumed.roles.trainable_state_dict(role)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), role


# --- the memory plan ---------------------------------------------------------------------------------------------
def test_simulated_peak_counts_live_tensors_only():
    def run():
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = torch.empty(500, device="meta")  # 2000 bytes
        del b
        c = a * 2  # 4000 bytes while a lives: peak 8000
        del a, c

    assert simulate_peak_bytes(run) == 8000


def test_simulated_peak_does_not_charge_views_of_existing_weights():
    weight = torch.empty(1024, 1024, device="meta")  # made before the simulation: not its memory
    assert simulate_peak_bytes(lambda: weight.t()[:10].view(-1, 1024)) == 0
    assert simulate_peak_bytes(lambda: weight.t().reshape(-1)) == weight.numel() * 4  # a copy: charged


def test_simulated_attention_is_charged_as_fused_kernels_allocate_it():
    q = torch.empty(1, 8, 4096, 64, device="meta", requires_grad=True)

    def run():
        F.scaled_dot_product_attention(q, q, q).sum().backward()

    peak = simulate_peak_bytes(run)
    matrix = 8 * 4096 * 4096 * 4  # the L x L scores an unfused attention would hold: 512 MiB
    assert q.numel() * 4 <= peak < 8 * q.numel() * 4 < matrix


def test_simulation_emulates_autocast_dtypes():
    weight = torch.empty(64, 32, device="meta")
    seen, original = {}, F.linear

    def run():
        x = torch.empty(4, 32, device="meta")
        seen["linear"] = F.linear(x, weight).dtype
        seen["norm"] = F.layer_norm(F.linear(x, weight), (64,)).dtype

    simulate_peak_bytes(run, "bf16")
    assert seen == {"linear": torch.bfloat16, "norm": torch.float32}
    assert F.linear is original  # the functional ops are restored after the simulation


def test_optimizer_state_bytes_by_hand():
    lora_a, conv_down = torch.empty(8, 320), torch.empty(8, 320, 3, 3)
    assert optimizer_state_bytes([lora_a, conv_down], "adamw") == 4 * 2 * (8 * 320 + 8 * 320 * 9)
    # Adafactor factors the last two dims: rows + columns per leading index
    assert optimizer_state_bytes([lora_a, conv_down], "adafactor") == 4 * ((8 + 320) + 8 * 320 * (3 + 3))


def test_plan_phases_add_up():
    params = [torch.empty(1000)]
    plan = build_plan(base_bytes=GIB, adapter_parameters={"student": params, "fake": params}, optimizer_type="adamw",
                      simulated={"train_step": 300, "no_grad_call": 100}, text_encoder_bytes=50, vae_bytes=10)
    assert plan.phases["training"] == GIB + 8000 + 16000 + 10 + 300
    assert plan.phases["encoding prompts"] == GIB + 8000 + 50 + 10
    assert plan.peak == plan.phases["training"] and plan.peak_phase == "training"


def test_plan_before_loading_matches_the_plan_of_the_loaded_model(tiny_model_dir, tmp_path):
    settings = dict(network_dim=4, network_alpha=4, train_batch_size=2, resolution=64, fake_updates_per_step=2)
    before, _ = plan_memory(config_from_dict(dict(settings, pretrained_model_name_or_path=tiny_model_dir("tiny-sdxl"),
                                                  prompt_file="unused")), device="cpu")
    trainer = make_trainer(tiny_model_dir, tmp_path, tiny="tiny-sdxl", **settings)
    after = trainer.memory_plan
    assert after is not None and before is not None
    for part in ("base weights", "trained weights (fp32, student + fake)", "optimizer states", "VAE"):
        assert before.parts[part] == after.parts[part], part
    assert before.phases["training"] == pytest.approx(after.phases["training"], rel=0.02)


def test_gradient_checkpointing_lowers_the_planned_activations(tiny_model_dir):
    values = dict(pretrained_model_name_or_path=tiny_model_dir("tiny-sd15"), prompt_file="x", resolution=128,
                  train_batch_size=4, network_dim=4)
    plain, _ = plan_memory(config_from_dict(values), "cpu")
    checkpointed, _ = plan_memory(config_from_dict(dict(values, gradient_checkpointing=True)), "cpu")
    key = "trained step (activations + grads)"
    assert checkpointed.parts[key] < 0.8 * plain.parts[key]


def test_a_run_that_does_not_fit_stops_before_loading_and_names_the_knobs(tiny_model_dir, tmp_path, prompt_file,
                                                                           monkeypatch):
    import decoupled_dmd.trainer.api as api

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded although the plan does not fit")

    monkeypatch.setattr(api, "load_teacher", no_loading)
    config = config_from_dict(dict(pretrained_model_name_or_path=tiny_model_dir("tiny-sd15"), prompt_file=prompt_file,
                                   output_dir=str(tmp_path / "out"), memory_limit_gb=0.001, resolution=128,
                                   network_dim=16))
    with pytest.raises(MemoryPlanError) as error:
        distill(config)
    message = str(error.value)
    assert "nothing was trained" in message and "memory_limit_gb" in message
    for knob in ("gradient_checkpointing = true", "network_dim = 8", 'optimizer_type = "adafactor"'):
        assert knob in message
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_plan_that_does_not_fit_without_a_traceback(tiny_model_dir, tmp_path, prompt_file):
    completed = subprocess.run(
        [sys.executable, "-m", "decoupled_dmd.trainer.cli",
         "--pretrained_model_name_or_path", tiny_model_dir("tiny-sd15"),
         "--prompt_file", prompt_file, "--output_dir", str(tmp_path / "out"), "--memory_limit_gb", "0.001"],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "memory plan: this run needs about" in completed.stderr and "Traceback" not in completed.stderr
    assert "memory plan (cpu):" in completed.stderr  # the plan itself is printed first


def test_skipping_lora_input_casts_under_bf16_autocast_trains_bit_for_bit(tiny_model_dir, tmp_path):
    states = []
    for skip in (False, True):
        trainer = make_trainer(tiny_model_dir, tmp_path / str(skip), tiny="tiny-sdxl", mixed_precision="bf16",
                               max_train_steps=2)
        assert all(not layer.cast_input_dtype_enabled for layer in trainer.roles._layers)  # the trainer's default
        trainer.roles.skip_input_casts(skip)
        trainer.train_step()
        trainer.train_step()
        states.append({k: v.clone() for k, v in trainer.roles.trainable_state_dict("student").items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --- CUDA graphs of the no-grad calls (the plumbing, with a stand-in for the capture) -----------------------------
class _Replayed:
    """Stands in for torch.cuda.CUDAGraph: "capture" binds the call to the static buffers, a replay recomputes it
    into the same static output tensor, as a graph's replay rewrites its output memory."""

    def __init__(self, run, output):
        self.run, self.output, self.replays = run, output, 0

    def replay(self):
        self.output.copy_(self.run())
        self.replays += 1


def _stand_in_backend(captured):
    from decoupled_dmd.trainer.graphs import _CudaGraph

    class StandIn(_CudaGraph):
        def _capture(self, fn, pool):
            run = lambda: fn(self.x, self.level, self.cond)  # noqa: E731
            graph = _Replayed(run, run())
            captured.append(graph)
            return graph, graph.output
    return StandIn


def test_graphed_calls_capture_on_second_use_and_replay_fresh_inputs():
    from decoupled_dmd.trainer.denoiser import Conditioning
    from decoupled_dmd.trainer.graphs import GraphedCalls

    captured, eager_calls = [], []
    weight = torch.tensor(2.0)

    def fn(x, level, cond):
        eager_calls.append(x.shape)
        return x * weight + level[:, None] + cond["c"]

    graphs = GraphedCalls(backend=_stand_in_backend(captured))
    cond = Conditioning({"c": torch.ones(2, 3)})

    def call(x, level, name="student"):
        with torch.no_grad():
            return graphs(name, fn, x, level, cond)

    inputs = [(torch.randn(2, 3), torch.rand(2, dtype=torch.float64)) for _ in range(4)]
    results = [call(*i) for i in inputs]
    assert len(graphs.graphs) == 1 and captured[0].replays == 3  # first call eager, then captured
    first_replay = results[1]
    weight.fill_(3.0)  # the optimizer changes weights in place: a replay computes with the new ones
    results.append(call(*inputs[0]))
    assert torch.equal(first_replay, inputs[1][0] * 2 + inputs[1][1][:, None] + 1)  # not rewritten by later replays
    assert torch.equal(results[-1], inputs[0][0] * 3 + inputs[0][1][:, None] + 1)
    for (x, level), result in zip(inputs[1:4], results[1:4]):
        assert torch.allclose(result, x * 2 + level[:, None] + 1)
    call(torch.randn(1, 3), torch.rand(1, dtype=torch.float64))  # another shape: its own signature, eager first
    call(*inputs[0], name="teacher")
    assert len(graphs.graphs) == 1
    with torch.enable_grad():
        graphs("student", fn, *inputs[0], cond)  # with grad a call always runs eagerly
    assert captured[0].replays == 4


def test_a_call_that_cannot_be_captured_stays_eager():
    from decoupled_dmd.trainer.denoiser import Conditioning
    from decoupled_dmd.trainer.graphs import GraphedCalls

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = GraphedCalls(backend=refuse)
    cond = Conditioning({"c": torch.zeros(1, 2)})
    x, level = torch.ones(1, 2), torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        outputs = [graphs("fake", lambda a, b, c: a + 1, x, level, cond) for _ in range(3)]
    assert all(torch.equal(o, x + 1) for o in outputs)
    assert len(graphs.failed) == 1 and not graphs.graphs and "not permitted" in next(iter(graphs.failed.values()))


def test_training_with_replayed_no_grad_calls_is_bit_for_bit_the_eager_run(tiny_model_dir, tmp_path):
    from decoupled_dmd.trainer.graphs import GraphedCalls

    states, replays = [], []
    for graphed in (False, True):
        trainer = make_trainer(tiny_model_dir, tmp_path / str(graphed), tiny="tiny-sdxl", max_train_steps=3,
                               batch_fake_samples=True)  # rows leave the batched samples: several shapes
        assert trainer.graphs is None  # a CPU run: no graphs
        if graphed:
            captured = []
            trainer.graphs = GraphedCalls(backend=_stand_in_backend(captured))
        for _ in range(3):
            trainer.train_step()
        if graphed:
            replays = [g.replays for g in captured]
        states.append({k: v.clone() for k, v in trainer.roles.trainable_state_dict("student").items()}
                      | {f"fake.{k}": v.clone() for k, v in trainer.roles.trainable_state_dict("fake").items()})
    assert sum(replays) > 10  # student simulation, x_gen, teacher and fake calls were replayed
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_plan_holds_the_graph_pool_for_the_run():
    from decoupled_dmd.trainer.graphs import uses_cuda_graphs

    params = [torch.empty(1000)]
    common = dict(base_bytes=GIB, adapter_parameters={"student": params}, optimizer_type="adamw",
                  simulated={"train_step": 300, "no_grad_call": 100})
    plain, graphed = build_plan(**common), build_plan(**common, graph_pool=True)
    assert graphed.phases["training"] - plain.phases["training"] == 100
    assert graphed.parts["CUDA graph pool (no-grad calls)"] == 100
    config = config_from_dict({"pretrained_model_name_or_path": "x"})

    class Diffusers:
        supports_cuda_graphs = True

    assert config.cuda_graphs and uses_cuda_graphs(config, Diffusers, "cuda")
    assert not uses_cuda_graphs(config, Diffusers, "cpu")
    assert not uses_cuda_graphs(config.replace(cuda_graphs=False), Diffusers, "cuda")
    assert not uses_cuda_graphs(config, type("Comfy", (), {"supports_cuda_graphs": False}), "cuda")


def test_a_capture_records_the_weight_casts_itself():
    """Autocast caches the bf16 copy of an fp32 trainable weight while a context is open. A graph that read the
    warm-up's cached copy would read freed memory later, and never see an optimizer step: the capture must
    cast the weight itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from decoupled_dmd.trainer.denoiser import Conditioning
    from decoupled_dmd.trainer.graphs import GraphedCalls, _CudaGraph

    weight = torch.nn.Parameter(torch.randn(4, 4))
    inner = torch.autocast("cpu", dtype=torch.bfloat16)  # one object for every call, as accelerate's forward wrapper

    def fn(x, level, cond):
        with inner:
            return F.linear(x, weight).float()

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == tuple(weight.shape):
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    recorded = []

    class Counting(_CudaGraph):
        def _warm_up(self, fn):
            fn(self.x, self.level, self.cond)

        def _record(self, fn, pool):
            WeightCasts.count = 0
            with WeightCasts():
                output = fn(self.x, self.level, self.cond)
            recorded.append(WeightCasts.count)
            return _Replayed(lambda: fn(self.x, self.level, self.cond), output), output

    graphs = GraphedCalls(backend=Counting)
    cond, level = Conditioning({"c": torch.zeros(2, 1)}), torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's context around the calls
        for _ in range(2):
            graphs("student", fn, torch.randn(2, 4), level, cond)
    assert recorded == [1]


def test_on_a_cpu_a_plan_beyond_the_machines_ram_is_refused_before_loading(tiny_model_dir, tmp_path, prompt_file,
                                                                         monkeypatch):
    """Like a GPU's free memory: resolution 8192 printed a 242 GiB peak on a 23 GiB machine and started anyway."""
    import decoupled_dmd.trainer.api as api
    import decoupled_dmd.trainer.memory_plan as memory_plan

    available = memory_plan.available_ram_bytes()
    assert available is not None and available > 2**28  # this Linux machine reads its RAM
    monkeypatch.setattr(api, "load_teacher", lambda *a, **k: pytest.fail("loaded although the plan does not fit"))
    monkeypatch.setattr(memory_plan, "available_ram_bytes", lambda: 2**20)  # a machine with 1 MiB to spare
    config = config_from_dict(dict(pretrained_model_name_or_path=tiny_model_dir("tiny-sd15"), prompt_file=prompt_file,
                                   output_dir=str(tmp_path / "out"), resolution=64))
    with pytest.raises(MemoryPlanError, match="or on a CPU the RAM available"):
        distill(config)
    assert memory_plan.memory_limit_bytes(config, "cpu") == 2**20
    assert memory_plan.memory_limit_bytes(config_from_dict(dict(memory_limit_gb=2.0)), "cpu") == 2 * 2**30
    # a host's figure (ComfyUI's free memory plus the loaded UNet) replaces the process's own reading, not the limit
    assert memory_plan.memory_limit_bytes(config, "cpu", host_available=3 * 2**30) == 3 * 2**30
    assert memory_plan.memory_limit_bytes(config_from_dict(dict(memory_limit_gb=2.0)), "cpu", 3 * 2**30) == 2 * 2**30
