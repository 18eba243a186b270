"""The prepared GPU check: real-scale training cost of Decoupled DMD on one NVIDIA GPU, no network.

Run it with `bash benchmarks/gpu_check.sh [OUT_DIR]` (which installs the carried wheels first). It builds
full-size SDXL- and SD1.5-architecture models with random weights (UNet, both CLIP text encoders, VAE:
random weights cost and fit exactly as trained ones do) and measures, each part in a process of its own:

- sdxl: 1024 px, batch 1, bf16, gradient checkpointing, LoRA rank 64, AdamW, five fake updates: seconds
  per generator update (with its forward-equivalent count and seconds by phase), peak GPU memory against
  the memory plan, the compute floor (forward-equivalents x one measured teacher forward), and the
  student's 4-step sampling against the teacher's 50-step CFG sampling (wall clock, same noise);
- sdxl-24gb: the same training under a 24 GiB cap (torch.cuda.set_per_process_memory_fraction), and the
  plan's verdict for a 24 GiB limit;
- sd15: SD1.5 at 512 px with the same settings.

It writes gpu_check.json and gpu_check.md into OUT_DIR. `--small` runs the same code on quarter-width
models at 256 px on any device, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from decoupled_dmd.trainer.random_models import (
    TINY_TOKENIZER_SPECIAL_TOKENS,
    build_parts,
    build_unet,
    text_encoder_configs,
    unet_config,
    vae_config,
)

GIB = 1024 ** 3
PROMPTS = ["a portrait of an old fisherman, golden hour", "a red fox in fresh snow, telephoto",
           "an isometric illustration of a tiny city", "a bowl of ramen on a wooden table, film photo",
           "a watercolor of a lighthouse in a storm", "a robot gardener tending tomatoes",
           "macro photo of a dragonfly wing", "a cozy reading nook with plants"]
TRAIN_SETTINGS = dict(mixed_precision="bf16", gradient_checkpointing=True, network_dim=64, network_alpha=8.0,
                      optimizer_type="adamw", fake_updates_per_step=5, train_batch_size=1, log_with="none",
                      max_train_steps=1000, save_every_n_steps=0, sample_every_n_steps=0)


def _unet_config(family: str, small: bool) -> dict:
    """The family's full UNet, or (small) a quarter of its widths with SDXL's transformer depth cut to (1, 1, 2)."""
    if not small:
        return unet_config(family)
    return unet_config(family, width_divisor=4, transformer_layers=(1, 1, 2) if family == "sdxl" else None)


def build_adapter(family: str, device: str, small: bool = False, weight_dtype: torch.dtype | None = None):
    """An SDXL or SD1.5 teacher with random weights, built directly on `device` (weights bf16 on CUDA)."""
    from transformers import CLIPTokenizer

    from decoupled_dmd.demo.models import write_clip_tokenizer
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
    from decoupled_dmd.trainer.schedules import DiscreteVPSchedule

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tempfile.mkdtemp(prefix="gpu-check-tok-"),
                                                                   max_length=77))
    encoders = text_encoder_configs(family, layers=2 if small else None, special_tokens=TINY_TOKENIZER_SPECIAL_TOKENS)
    weight_dtype = weight_dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    # UNet and encoders built in the weight dtype: no fp32 copy of the UNet ever exists; the VAE stays fp32
    parts = build_parts(_unet_config(family, small), encoders, vae_config(family), device=device, dtype=weight_dtype,
                        seed=0)
    return DiffusersAdapter(parts.unet, parts.text_encoders, [tokenizer] * len(encoders),
                            DiscreteVPSchedule.scaled_linear(), "epsilon", vae=parts.vae)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeat: int = 1) -> float:
    _sync()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - started) / repeat


def _memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def run_training(family: str, resolution: int, steps: int, warmup: int, small: bool, memory_limit_gb: float = 0.0,
                 sampling: bool = False) -> dict:
    """Build the teacher and a trainer, run warm-up and timed generator updates; optionally the sampling race."""
    from decoupled_dmd.trainer.accounting import expected_forward_equivalents
    from decoupled_dmd.trainer.config import config_from_dict
    from decoupled_dmd.trainer.loop import DecoupledDMDTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"family": family, "resolution": resolution, "small": small}
    started = time.perf_counter()
    adapter = build_adapter(family, device, small)
    out["build_seconds"] = time.perf_counter() - started
    out["unet_parameters"] = sum(p.numel() for p in adapter.network.parameters())
    out["text_encoder_parameters"] = adapter.text_encoder_parameters()
    settings = dict(TRAIN_SETTINGS, resolution=resolution, memory_limit_gb=memory_limit_gb or 1e6,
                    output_dir=tempfile.mkdtemp(prefix="gpu-check-run-"), pretrained_model_name_or_path="(in memory)")
    if device == "cpu":
        settings["mixed_precision"] = "no"
    config = config_from_dict(settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = DecoupledDMDTrainer(config, adapter, PROMPTS)
    out["setup_seconds"] = time.perf_counter() - started
    out["setup_memory"] = _memory()
    plan = trainer.memory_plan
    out["plan"] = plan.to_dict() if plan is not None else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, logs = [], []
    for index in range(warmup + steps):
        seconds = _timed(trainer.train_step)
        logs.append(trainer.meter.logs())
        if index >= warmup:
            times.append(seconds)
    out["train_memory"] = _memory()
    out["seconds_per_update"] = sum(times) / len(times)
    out["seconds_per_update_all"] = times
    out["nonfinite_skips"] = trainer.nonfinite_skips
    timed = logs[warmup:]
    out["forward_equivalents"] = {k[3:]: sum(log[k] for log in timed) / len(timed) for k in timed[0]
                                  if k.startswith("fe_")}
    out["phase_seconds"] = {k[8:]: sum(log.get(k, 0.0) for log in timed) / len(timed) for k in timed[0]
                            if k.startswith("seconds_")}
    out["expected_forward_equivalents"] = expected_forward_equivalents(
        len(config.student_timesteps), config.fake_updates_per_step, gradient_checkpointing=True,
        dm_cfg_reference=config.update_normalization == "per_term_cfg")

    # one teacher forward at the training shape: the unit of the compute floor
    roles = trainer.roles
    cond = trainer.conditioning([PROMPTS[0]])
    x = torch.randn((1, *trainer.latent_shape), device=device)
    level = torch.full((1,), 0.5, dtype=torch.float64, device=device)
    teacher = roles.activate("teacher")

    def teacher_forward():
        with torch.no_grad(), trainer.accelerator.autocast():
            adapter.predict_x0(teacher, x, level, cond)

    teacher_forward()
    out["teacher_forward_seconds"] = _timed(teacher_forward, 5)
    out["compute_floor_seconds"] = out["expected_forward_equivalents"]["total"] * out["teacher_forward_seconds"]
    if sampling:
        out["sampling"] = sampling_race(trainer, adapter, device)
    return out


@torch.no_grad()
def sampling_race(trainer, adapter, device: str) -> dict:
    """Teacher 50 steps with CFG against the student's 4 steps at cfg 1 (unmerged LoRA and merged), one image."""
    from diffusers import UNet2DConditionModel

    from decoupled_dmd.trainer.sampling import cfg_sample, few_step_sample

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((1, *trainer.latent_shape), generator=generator).to(device)
    cond = trainer.conditioning([PROMPTS[1]])
    uncond = trainer.uncond(1)
    roles, autocast = trainer.roles, trainer.accelerator.autocast
    teacher = adapter.denoiser(roles.activate("teacher"))

    def teacher_run():
        with autocast():
            return cfg_sample(teacher, noise, cond, uncond, trainer.guidance_scale, 50)

    def student_run(denoiser):
        def run():
            with autocast():
                return few_step_sample(denoiser, noise, trainer.levels, cond,
                                       generator=torch.Generator().manual_seed(1))
        return run

    lora_student = trainer.denoiser("student")
    merged_state = roles.merged_state_dict("student")
    with torch.device("meta"):
        merged_unet = UNet2DConditionModel.from_config(adapter.network.config)
    merged_unet.load_state_dict(merged_state, assign=True)
    merged_unet.eval().requires_grad_(False)
    del merged_state
    merged_student = adapter.denoiser(merged_unet)
    out = {}
    for name, run in (("teacher_50_cfg", teacher_run), ("student_4_lora", student_run(lora_student)),
                      ("student_4_merged", student_run(merged_student))):
        run()  # warm-up
        out[f"{name}_seconds"] = _timed(run, 2)
    latents = student_run(merged_student)()
    out["vae_decode_seconds"] = _timed(lambda: adapter.decode(latents), 2)
    decode = out["vae_decode_seconds"]
    for student in ("student_4_lora", "student_4_merged"):
        out[f"speedup_{student}"] = out["teacher_50_cfg_seconds"] / out[f"{student}_seconds"]
        out[f"speedup_{student}_with_decode"] = ((out["teacher_50_cfg_seconds"] + decode)
                                                 / (out[f"{student}_seconds"] + decode))
    del merged_unet
    return out


def run_part(name: str, small: bool) -> dict:
    if name == "sdxl":
        return run_training("sdxl", 256 if small else 1024, steps=5, warmup=2, small=small, sampling=True)
    if name == "sdxl-24gb":
        out = {"cap_bytes": 24 * GIB}
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        if total:
            torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GIB / total))
        verdict = _plan_verdict(small)
        out["plan_verdict_24gb"] = verdict
        try:
            out.update(run_training("sdxl", 256 if small else 1024, steps=2, warmup=1, small=small))
            out["fits"] = True
        except torch.cuda.OutOfMemoryError as error:
            out["fits"] = False
            out["error"] = str(error)[:400]
        return out
    if name == "sdxl-speed":
        return speed_part("sdxl", 256 if small else 1024, small)
    if name == "sd15":
        return run_training("sd15", 128 if small else 512, steps=4, warmup=1, small=small)
    if name == "profile":
        return profile_part("sdxl", 256 if small else 1024, small)
    raise ValueError(f"unknown part {name!r}")


def speed_part(family: str, resolution: int, small: bool) -> dict:
    """Seconds per generator update before and after each waste cut, on one trainer (research.cost.compare_speed)."""
    from decoupled_dmd.research.cost import compare_speed
    from decoupled_dmd.trainer.config import config_from_dict
    from decoupled_dmd.trainer.loop import DecoupledDMDTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = build_adapter(family, device, small)
    settings = dict(TRAIN_SETTINGS, resolution=resolution, memory_limit_gb=1e6,
                    output_dir=tempfile.mkdtemp(prefix="gpu-check-speed-"), pretrained_model_name_or_path="(in memory)")
    if device == "cpu":
        settings["mixed_precision"] = "no"
    trainer = DecoupledDMDTrainer(config_from_dict(settings), adapter, PROMPTS)
    return {"family": family, "resolution": resolution,
            "variants": compare_speed(trainer, rounds=2, warmup=1, synchronize=_sync)}


def profile_part(family: str, resolution: int, small: bool) -> dict:
    """Where one UNet call's time goes: the plain UNet against the trainer's roles (peft layers, autocast), eager
    against a CUDA-graph replay of the same call (the launch-bound share), and the profiler's kernel time and
    launches of the fake's training call."""
    from decoupled_dmd.trainer.config import config_from_dict
    from decoupled_dmd.trainer.loop import DecoupledDMDTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = build_adapter(family, device, small)
    unet = adapter.network
    out: dict = {"family": family, "resolution": resolution,
                 "attention_processor": type(next(iter(unet.attn_processors.values()))).__name__}
    latent = resolution // 8
    x = torch.randn((1, 4, latent, latent), device=device, dtype=unet.dtype)
    cond = adapter.example_conditioning(1, device)
    cond = type(cond)({k: torch.randn_like(v, dtype=unet.dtype) for k, v in cond.tensors.items()})
    level = torch.full((1,), 0.5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def plain():
        adapter.predict_x0(unet, x, level, cond)

    @torch.no_grad()
    def plain_autocast():
        with torch.autocast(device, dtype=torch.bfloat16):
            adapter.predict_x0(unet, x, level, cond)

    for name, fn in (("plain_bf16", plain), ("plain_bf16_autocast", plain_autocast)):
        fn()
        out[f"{name}_seconds"] = _timed(fn, 5)
    settings = dict(TRAIN_SETTINGS, resolution=resolution, memory_limit_gb=1e6,
                    output_dir=tempfile.mkdtemp(prefix="gpu-check-profile-"),
                    pretrained_model_name_or_path="(in memory)")
    if device == "cpu":
        settings["mixed_precision"] = "no"
    trainer = DecoupledDMDTrainer(config_from_dict(settings), adapter, PROMPTS)
    x32 = x.float()

    def role_call(role, grad=False):
        def run():
            network = trainer.roles.activate(role)
            with torch.set_grad_enabled(grad), trainer.accelerator.autocast():
                x0 = adapter.predict_x0(network, x32, level, cond)
            if grad:
                x0.float().square().mean().backward()
        return run

    for name, fn in (("teacher", role_call("teacher")), ("student_nograd", role_call("student")),
                     ("fake_forward_backward", role_call("fake", grad=True))):
        fn()
        out[f"{name}_seconds"] = _timed(fn, 3)
    if device == "cuda":
        out.update(graph_checks(trainer, adapter, x32, level, cond))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            role_call("fake", grad=True)()
            _sync()
        events = prof.key_averages()
        out["fake_forward_backward_kernel_seconds"] = sum(e.self_device_time_total for e in events) / 1e6
        out["fake_forward_backward_launches"] = sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                                                         "cuLaunchKernelEx"))
        out["top_device_ops"] = [(e.key[:60], round(e.self_device_time_total / 1e3, 2), e.count)
                                 for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]]
        out["top_cpu_ops"] = [(e.key[:60], round(e.self_cpu_time_total / 1e3, 2), e.count)
                              for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]]
    return out


def graph_checks(trainer, adapter, x, level, cond) -> dict:
    """The trainer's CUDA graph of a no-grad student call against the eager call (same output?), its time, and
    an experiment for what is left: the fake's training forward + backward as a graphed callable."""
    from decoupled_dmd.trainer.graphs import GraphedCalls

    out: dict = {}
    graphs = GraphedCalls()

    def graphed():
        with torch.no_grad(), trainer.accelerator.autocast():
            network = trainer.roles.activate("student")
            return graphs("student", functools.partial(adapter.predict_x0, network), x, level, cond)

    with torch.no_grad(), trainer.accelerator.autocast():
        eager = adapter.predict_x0(trainer.roles.activate("student"), x, level, cond)
    graphed()
    replayed = graphed()
    out["graph_captured"] = bool(graphs.graphs)
    out["graph_failures"] = list(graphs.failed.values())
    out["graph_vs_eager_max_abs_diff"] = float((replayed - eager).abs().max())
    out["graph_vs_eager_bit_identical"] = bool(torch.equal(replayed, eager))
    out["student_nograd_cuda_graph_seconds"] = _timed(graphed, 5)
    graphs.reset()
    try:  # experiment: the fake's training call (forward, gradient-checkpointed backward) as a graphed callable
        from decoupled_dmd.trainer.denoiser import Conditioning

        names = sorted(cond.tensors)

        class FakeCall(torch.nn.Module):
            def __init__(self, network):
                super().__init__()
                self.network = network

            def forward(self, x_t, lvl, *tensors):
                return adapter.predict_x0(self.network, x_t, lvl, Conditioning(dict(zip(names, tensors))))

        network = trainer.roles.activate("fake")
        call = FakeCall(network)
        args = (x, level, *[cond[n] for n in names])
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            graphed_call = torch.cuda.make_graphed_callables(call, args, num_warmup_iters=2,
                                                            allow_unused_input=True)  # the student adapter

        def step(fn):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    x0 = fn(*args)
                x0.float().square().mean().backward()
            return run

        step(call)()
        out["fake_forward_backward_eager_seconds"] = _timed(step(call), 3)
        out["fake_forward_backward_graphed_seconds"] = _timed(step(graphed_call), 3)
    except Exception as error:
        out["training_graph_error"] = f"{type(error).__name__}: {str(error)[:400]}"
    return out


def _plan_verdict(small: bool) -> str:
    """The plan's answer for a 24 GiB limit, made on the meta device before any weight exists."""
    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
    from decoupled_dmd.trainer.config import config_from_dict
    from decoupled_dmd.trainer.memory_plan import (
        MemoryPlanError,
        check_fits,
        knob_savings,
        plan_training_memory,
        skeleton_roles,
    )
    from decoupled_dmd.trainer.schedules import DiscreteVPSchedule

    config = config_from_dict(dict(TRAIN_SETTINGS, resolution=256 if small else 1024, memory_limit_gb=24))

    def plan_for(changed):
        unet = build_unet(_unet_config("sdxl", small), device="meta").requires_grad_(False)
        unet.to(torch.bfloat16 if changed.mixed_precision == "bf16" else torch.float32)
        adapter = DiffusersAdapter(unet, [], [], DiscreteVPSchedule.scaled_linear(), "epsilon")
        adapter.latent_downscale = 8
        roles = skeleton_roles(adapter, changed)
        height, width = changed.resolution_hw()
        return plan_training_memory(adapter, roles, changed, adapter.latent_shape(height, width),
                                    adapter.example_conditioning, "cuda", 817_000_000, 83_650_000)

    plan = plan_for(config)
    try:
        check_fits(plan, 24 * GIB, lambda: knob_savings(plan_for, config, plan))
        return f"fits: plan peak {plan.peak / GIB:.2f} GiB ({plan.peak_phase})"
    except MemoryPlanError as error:
        return str(error)


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
           "transformers": transformers.__version__}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        out.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / GIB, 1))
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [f"# GPU check, {v['date'][:10]}", "",
             f"{v.get('gpu', 'CPU')} ({v.get('gpu_memory_gib', '?')} GiB, driver {v.get('driver', '?')}); "
             f"torch {v['torch']} "
             f"(CUDA {v['cuda']}), diffusers {v['diffusers']}, peft {v['peft']}, accelerate {v['accelerate']}, "
             f"transformers {v['transformers']}.", "",
             "| run | s / generator update | FE / update | floor (FE x 1 fwd) | peak allocated | plan "
             "| plan / measured |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, part in results["parts"].items():
        if "variants" in part or name == "profile":
            continue
        if "error" in part and "seconds_per_update" not in part:
            lines.append(f"| {name} | failed: {part['error'][:160]} | | | | | |")
            continue
        peak = part.get("train_memory", {}).get("peak_allocated", 0)
        plan = (part.get("plan") or {}).get("peak", 0)
        ratio = f"{plan / peak:.2f}" if plan and peak else ""
        lines.append(f"| {name} ({part['family']}, {part['resolution']} px) | {part['seconds_per_update']:.2f} | "
                     f"{part['forward_equivalents'].get('total', 0):.1f} | {part['compute_floor_seconds']:.2f} s | "
                     f"{peak / GIB:.2f} GiB | {plan / GIB:.2f} GiB | {ratio} |")
    sdxl = results["parts"].get("sdxl", {})
    if "phase_seconds" in sdxl:
        lines += ["", "SDXL seconds by phase (per generator update): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in sdxl["phase_seconds"].items())]
        lines += ["", "SDXL forward-equivalents by role: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in sdxl["forward_equivalents"].items() if k.count("_") == 0)]
    if "sampling" in sdxl:
        s = sdxl["sampling"]
        lines += ["", f"| sampling, SDXL {sdxl['resolution']} px, one image | seconds | speed-up vs teacher |",
                  "| --- | --- | --- |",
                  f"| teacher 50 steps, CFG | {s['teacher_50_cfg_seconds']:.2f} | 1 |",
                  f"| student 4 steps, LoRA unmerged (the trainer's denoiser) | {s['student_4_lora_seconds']:.3f} | "
                  f"{s['speedup_student_4_lora']:.1f}x |",
                  f"| student 4 steps, LoRA merged | {s['student_4_merged_seconds']:.3f} | "
                  f"{s['speedup_student_4_merged']:.1f}x |",
                  f"| VAE decode | {s['vae_decode_seconds']:.3f} | (with decode: "
                  f"{s['speedup_student_4_merged_with_decode']:.1f}x merged) |"]
    speed = results["parts"].get("sdxl-speed", {})
    if "variants" in speed:
        from decoupled_dmd.research.cost import speed_markdown

        lines += ["", speed_markdown({f"SDXL {speed['resolution']} px": speed["variants"]})]
    prof = results["parts"].get("profile", {})
    if "teacher_seconds" in prof:
        lines += ["", f"| one UNet call, {prof['family']} {prof['resolution']} px, batch 1 | seconds |",
                  "| --- | --- |"]
        lines += [f"| {k[:-8]} | {v:.4f} |" for k, v in prof.items() if k.endswith("_seconds")]
    cap = results["parts"].get("sdxl-24gb")
    if cap:
        peak = (" (peak allocated %.2f GiB)" % (cap["train_memory"]["peak_allocated"] / GIB)
                if cap.get("train_memory") else "")
        lines += ["", f"24 GiB cap: {'fits' if cap.get('fits') else 'does NOT fit'}{peak}; "
                      f"plan verdict: {cap.get('plan_verdict_24gb', '')[:300]}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="output/gpu-check")
    parser.add_argument("--small", action="store_true", help="quarter-width models at low resolution (a script check)")
    parser.add_argument("--part", help="run one part in this process and print its JSON (used internally)")
    parser.add_argument("--parts", default="sdxl,sdxl-24gb,sd15")
    parser.add_argument("--timeouts", default="220,130,100", help="seconds per part, in --parts order")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.part:
        try:
            result = run_part(args.part, args.small)
        except Exception as error:  # report, don't hide: the summary shows it
            import traceback

            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        print("RESULT " + json.dumps(result))
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = {"versions": versions(), "parts": {}}
    timeouts = [float(t) for t in args.timeouts.split(",")]
    for index, part in enumerate(args.parts.split(",")):
        timeout = timeouts[min(index, len(timeouts) - 1)]
        command = [sys.executable, os.path.abspath(__file__), "--part", part] + (["--small"] if args.small else [])
        started = time.perf_counter()
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {
                "error": f"exit {completed.returncode}: {completed.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {timeout:.0f} s"}
        result["wall_seconds"] = time.perf_counter() - started
        results["parts"][part] = result
        print(f"{part}: " + json.dumps({k: v for k, v in result.items() if k not in ("plan", "traceback")})[:1500],
              flush=True)
        if "traceback" in result:
            print(result["traceback"], flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    print(markdown(results))
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
