"""Cost of Decoupled DMD's LoRA mode against the naive full-copy mode: seconds per update and peak memory.

Every measurement runs in its own process (`python -m decoupled_dmd.research.cost CASE.json`), so its peak
resident memory (VmHWM) belongs to that case alone. Models:
- tiny: the shipped demo teacher;
- sdxl-quarter: the SDXL UNet architecture at a quarter of its channel widths (random weights);
- sdxl: the full-size SDXL UNet (2.6 B parameters, random weights, built from config: no download).
Text encoders are one-layer CLIP encoders of SDXL's widths, so that the UNet dominates memory as it does
in practice once prompts are cached. "activations" is the peak of one forward/backward of the student
(LoRA on the frozen base) above the loaded weights, measured in a process of its own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger("decoupled_dmd.benchmark")

GIB = 1024 ** 3
CASES = {
    # name: (model, latent size (these cost models have no VAE: 32 latents = SDXL at 256 px), training settings)
    "tiny": ("tiny", None, dict(student_timesteps=None, train_batch_size=16, fake_updates_per_step=2, network_dim=8,
                               network_alpha=8.0)),
    "sdxl-quarter": ("sdxl-quarter", 32, dict(student_timesteps=[999, 749, 499, 249], train_batch_size=1,
                                               fake_updates_per_step=1, network_dim=64, network_alpha=8.0)),
    "sdxl": ("sdxl", 16, dict(student_timesteps=[999, 749, 499, 249], train_batch_size=1, fake_updates_per_step=1,
                               network_dim=64, network_alpha=8.0)),
}
WIDTH_DIVISORS = {"sdxl": 1, "sdxl-quarter": 4}  # the SDXL-architecture models: SDXL's UNet at 1 / divisor width


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Start VmHWM afresh at the current RSS (Linux: write 5 to clear_refs), so a peak is this phase's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
    except OSError:
        pass


def build_sdxl_adapter(width_divisor: int = 1, seed: int = 0):
    """An SDXL-architecture teacher with random weights (UNet at 1/width_divisor of SDXL's channels)."""
    from transformers import CLIPTokenizer

    from ..demo.models import write_clip_tokenizer
    from ..trainer.adapters.diffusers import DiffusersAdapter
    from ..trainer.random_models import TINY_TOKENIZER_SPECIAL_TOKENS, build_parts, text_encoder_configs, unet_config
    from ..trainer.schedules import DiscreteVPSchedule

    folder = tempfile.mkdtemp(prefix="dmd-cost-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, max_length=77))
    # one-layer encoders of SDXL's widths with a 1x MLP (quick_gelu, 1280-d projections): the UNet dominates
    encoders = text_encoder_configs("sdxl", layers=1, mlp_ratio=1, vocab_size=len(tokenizer),
                                    special_tokens=TINY_TOKENIZER_SPECIAL_TOKENS, hidden_act="quick_gelu",
                                    projection_dim=1280)
    parts = build_parts(unet_config("sdxl", width_divisor=width_divisor), encoders, seed=seed)
    return DiffusersAdapter(parts.unet, parts.text_encoders, [tokenizer, tokenizer], DiscreteVPSchedule.scaled_linear(),
                            "epsilon")


def measure_case(case: dict) -> dict:
    """Run in a fresh process: build the model, then either one student forward/backward ('activations') or a
    few DMD updates of `mode` (lora / full); report time and memory."""
    import torch

    torch.set_num_threads(case.get("threads", 2))
    import accelerate  # noqa: F401  (the libraries' own import cost is not the model's memory)
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401

    baseline = _rss_bytes()
    model, resolution, settings = CASES[case["case"]]
    settings = dict(settings, **case.get("settings", {}))
    if model == "tiny":
        from ..demo.models import TEACHER_DIR
        from ..trainer.adapters.diffusers import DiffusersAdapter

        adapter = DiffusersAdapter.from_pretrained(TEACHER_DIR)
    else:
        adapter = build_sdxl_adapter(WIDTH_DIVISORS[model])
    weight_bytes = sum(p.numel() * p.element_size() for p in adapter.network.parameters())
    loaded = _rss_bytes()
    out = {"case": case["case"], "mode": case["mode"], "weight_bytes": weight_bytes,
           "parameters": sum(p.numel() for p in adapter.network.parameters()),
           "rss_before_model": baseline, "rss_after_load": loaded, "network_dim": settings["network_dim"],
           "optimizer_type": settings.get("optimizer_type", "adamw")}
    if case["mode"] == "activations":
        from ..trainer.networks import LoraRoles

        roles = LoraRoles(adapter.network, settings["network_dim"], settings["network_alpha"],
                          adapter.default_lora_target_modules())
        height, width = (resolution, resolution) if resolution else adapter.default_resolution
        x = torch.randn(settings["train_batch_size"], *adapter.latent_shape(height, width))
        cond = adapter.encode_prompts(["a handwritten digit seven"] * x.shape[0])
        _reset_peak()
        started_rss = _rss_bytes()
        level = torch.full((x.shape[0],), 0.5, dtype=torch.float64)
        x0 = adapter.predict_x0(roles.activate("student"), x, level, cond)
        x0.square().mean().backward()
        out["activation_bytes"] = _rss_bytes("VmHWM") - started_rss
        out["peak_rss"] = _rss_bytes("VmHWM")
        return out
    from ..demo.experiment import BASE_SETTINGS
    from ..demo.worlds import flow_timesteps_matching_sdxl
    from ..trainer.config import config_from_dict
    from ..trainer.loop import DecoupledDMDTrainer

    values = dict(BASE_SETTINGS, **settings, training_mode=case["mode"], max_train_steps=case["steps"],
                  output_dir=case["output_dir"], pretrained_model_name_or_path="(in memory)", guidance_scale=3.0)
    if values["student_timesteps"] is None:
        values["student_timesteps"] = flow_timesteps_matching_sdxl(4)
    if resolution:
        values["resolution"] = resolution
    if model != "tiny":
        values.pop("mean_variance_target_mean")
        values.pop("mean_variance_target_var")
    config = config_from_dict(values)
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    trainer = DecoupledDMDTrainer(config, adapter, prompts)
    times = []
    for _ in range(case["steps"]):
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
    out["seconds_per_step"] = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    out["first_step_seconds"] = times[0]
    out["peak_rss"] = _rss_bytes("VmHWM")
    out["trainable_parameters"] = sum(p.numel() for role in ("student", "fake")
                                      for p in trainer.roles.trainable_parameters(role))
    if trainer.memory_plan is not None:
        out["plan"] = trainer.memory_plan.to_dict()
    work = trainer.meter.logs()
    out["forward_equivalents"] = work.get("fe_total")
    out["phase_seconds"] = {k[8:]: v for k, v in work.items() if k.startswith("seconds_")}
    return out


def naive_estimate_bytes(weight_bytes: int) -> int:
    """Lower bound of the full-copy mode: frozen teacher, student and fake copies (fp32), their gradients and
    two AdamW moments each: 1 + 2 * (1 + 1 + 2) = 9 copies of the weights."""
    return 9 * weight_bytes


def _run_subprocess(case: dict, timeout: float) -> dict:
    handle, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(case, stream)
    try:
        completed = subprocess.run([sys.executable, "-m", "decoupled_dmd.research.cost", path], capture_output=True,
                                   text=True, timeout=timeout, env=dict(os.environ, TQDM_DISABLE="1"))
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    finally:
        os.remove(path)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**case, "error": f"exit {completed.returncode}: {(completed.stderr or completed.stdout)[-800:]}"}


def available_memory_bytes() -> int:
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_weight_bytes(size: str) -> int:
    """fp32 bytes of a case's UNet, counted on the meta device (nothing allocated)."""
    from ..trainer.random_models import build_unet, unet_config

    if CASES[size][0] == "tiny":
        return 2 * 1024 ** 2
    unet = build_unet(unet_config("sdxl", width_divisor=WIDTH_DIVISORS[size]), device="meta")
    return 4 * sum(p.numel() for p in unet.parameters())


def run_cost_benchmark(sizes: list[str], output_dir: str, steps: int = 3, threads: int = 2,
                       timeout: float = 1800, rank: int | None = None, optimizer: str | None = None) -> dict:
    """Measure each model size in LoRA and (where it fits in memory) full mode; returns the figures.

    `rank` overrides the LoRA rank of the SDXL-architecture cases (default: DMD2's 64), `optimizer` the
    optimiser of every case (default: AdamW).
    """
    results = []
    for size in sizes:
        if size not in CASES:
            raise ValueError(f"unknown cost size {size!r}; choose from {list(CASES)}")
        for mode in ("activations", "lora", "full"):
            case = {"case": size, "mode": mode, "steps": steps if size == "tiny" else 2, "threads": threads,
                    "output_dir": os.path.join(output_dir, f"{size}-{mode}")}
            case["settings"] = {}
            if rank and size != "tiny":
                case["settings"]["network_dim"] = rank
            if optimizer:
                case["settings"]["optimizer_type"] = optimizer
            weights = estimate_weight_bytes(size)
            # never push the machine into the OOM killer: 9x the weights for full copies, 1.7x + 1 GiB else
            need = naive_estimate_bytes(weights) if mode == "full" else int(1.7 * weights) + GIB
            if need > 0.9 * available_memory_bytes():
                results.append({**case, "skipped": f"needs about {need / GIB:.1f} GiB, "
                                                   f"{available_memory_bytes() / GIB:.1f} GiB available",
                                "weight_bytes": weights, "estimate_bytes": need})
                continue
            logger.info("cost: %s %s", size, mode)
            results.append(_run_subprocess(case, timeout))
            logger.info("cost: %s", {k: v for k, v in results[-1].items() if k != "output_dir"})
    return {"results": results}


def cost_markdown(cost: dict) -> str:
    lines = ["## Cost: LoRA mode against full copies (CPU)", "",
             "| model | params | weights | mode | s/update | FE/update | peak RSS above imports | / weights | plan "
             "| plan / RSS | goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_case: dict = {}
    for r in cost["results"]:
        by_case.setdefault(r["case"], {})[r["mode"]] = r
    for case, modes in by_case.items():
        activations = modes.get("activations", {}).get("activation_bytes")
        for mode in ("lora", "full"):
            r = modes.get(mode)
            if r is None:
                continue
            weights = r.get("weight_bytes", 0)
            params = f"{r['parameters'] / 1e6:.1f} M" if "parameters" in r else ""
            if "skipped" in r or "error" in r:
                lines.append(f"| {case} | {params} | {weights / GIB:.2f} GiB | {mode} | | | "
                             f"{r.get('skipped') or r.get('error', '')[:120]} | | | | |")
                continue
            peak = r["peak_rss"] - r["rss_before_model"]
            goal = ""
            if mode == "lora" and activations is not None:
                bound = 1.3 * weights + activations
                goal = f"<= 1.3 W + act = {bound / GIB:.2f} GiB: {'yes' if peak <= bound else 'no'}"
            if mode == "full" and "lora" in modes and "peak_rss" in modes["lora"]:
                lora_peak = modes["lora"]["peak_rss"] - modes["lora"]["rss_before_model"]
                goal = f"LoRA / full = {lora_peak / peak:.2f} (goal < 0.5)"
            label = mode
            if mode == "lora":
                label = f"LoRA rank {r.get('network_dim', '?')}, {r.get('optimizer_type', 'adamw')}"
                if r.get("trainable_parameters"):
                    millions = r["trainable_parameters"] / 1e6
                    label += f" ({millions:.{0 if millions >= 10 else 2}f} M trainable, both adapters)"
            plan = (r.get("plan") or {}).get("peak")
            plan_cells = f"{plan / GIB:.2f} GiB | {plan / peak:.2f}" if plan else " | "
            fe = f"{r['forward_equivalents']:.1f}" if r.get("forward_equivalents") else ""
            lines.append(f"| {case} | {params} | {weights / GIB:.3f} GiB | {label} | {r['seconds_per_step']:.2f} | "
                         f"{fe} | {peak / GIB:.2f} GiB | {peak / weights:.2f} | {plan_cells} | {goal} |")
        if activations is not None:
            lines.append(f"| {case} | | | one student fwd/bwd | | | {activations / GIB:.2f} GiB activations | | | | |")
    lines += ["", "Peak RSS is the process's high-water mark minus its resident size after the imports, before the "
                  "model was built. Full mode's skipped rows: the naive mode needs at least the frozen teacher, two "
                  "trained copies, their gradients and AdamW's two moments (9x the weights). FE: backbone "
                  "forward-equivalents of the last update (a backward counts 2). Plan: the memory plan's peak "
                  "(tensor bytes, what a GPU's max_memory_allocated counts); RSS adds the C allocator's retained "
                  "and fragmented memory.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as stream:
        requested = json.load(stream)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(measure_case(requested)))


# --- speed of one generator update, before and after each waste cut, side by side ------------------------------
GRAPH_ROW = "same math: + CUDA graphs of the no-grad calls"
_ALL = {"batch_teacher_rows": True, "fast_switch": True, "skip_input_casts": True, "cuda_graphs": True}
SPEED_VARIANTS = {
    # name: (trainer attributes, config changes); each row adds to the one before it. CUDA graphs act on a GPU
    # only: a trainer without them (a CPU run) skips their row.
    "before (two teacher calls, peft role switch, LoRA input casts)": (
        {"batch_teacher_rows": False, "fast_switch": False, "skip_input_casts": False, "cuda_graphs": False}, {}),
    "same math: one teacher call, fast role switch": (dict(_ALL, skip_input_casts=False, cuda_graphs=False), {}),
    "same math: + no LoRA input casts (mixed precision)": (dict(_ALL, cuda_graphs=False), {}),
    GRAPH_ROW: (_ALL, {}),
    "+ batch_fake_samples": (_ALL, {"batch_fake_samples": True}),
    "+ share_generator_sample": (_ALL, {"batch_fake_samples": True, "share_generator_sample": True}),
}


def two_teacher_calls(trainer):
    """The trainer's Algorithm 1 as it was before the batching cut, to measure that cut: CA's pair of teacher
    rows in one call, DM's rows in a second (same math, same draws)."""
    from ..trainer.method import DecoupledDMD

    class TwoTeacherCalls(DecoupledDMD):
        def teacher_predictions(self, inputs):
            predictions = []
            for group in (inputs[:2], inputs[2:]):
                predictions += super().teacher_predictions(group)
            return predictions

    method = TwoTeacherCalls(trainer)
    method.regression = trainer.method.regression  # the same pairs
    return method


def compare_speed(trainer, rounds: int = 3, warmup: int = 1, synchronize=None) -> dict:
    """Seconds per generator update of each SPEED_VARIANTS row on one trainer (same model, same process),
    interleaved round by round so that drift of the machine hits every variant alike."""
    synchronize = synchronize or (lambda: None)
    base_config = trainer.config
    graphs, batched = trainer.graphs, trainer.method
    unbatched = two_teacher_calls(trainer)
    variants = {name: v for name, v in SPEED_VARIANTS.items() if graphs is not None or name != GRAPH_ROW}
    times: dict[str, list[float]] = {name: [] for name in variants}
    work: dict[str, dict] = {}

    def use(attributes: dict, changes: dict) -> None:
        trainer.method = batched if attributes["batch_teacher_rows"] else unbatched
        if hasattr(trainer.roles, "use_fast_switch"):
            trainer.roles.use_fast_switch(attributes["fast_switch"])
            trainer.roles.skip_input_casts(attributes["skip_input_casts"] and base_config.mixed_precision != "no")
        trainer.graphs = graphs if attributes["cuda_graphs"] else None
        trainer.config = base_config.replace(**changes)

    for _ in range(warmup):  # kernels chosen, caches filled, graphs captured: not charged to any timed round
        for attributes, changes in variants.values():
            use(attributes, changes)
            trainer.train_step()
    for _ in range(rounds):
        state = trainer.random.generator.get_state()
        for name, (attributes, changes) in variants.items():
            trainer.random.generator.set_state(state)  # every variant of a round draws the same first steps
            use(attributes, changes)
            synchronize()
            started = time.perf_counter()
            trainer.train_step()
            synchronize()
            times[name].append(time.perf_counter() - started)
            work[name] = trainer.meter.logs()
    trainer.config, trainer.graphs, trainer.method = base_config, graphs, batched
    before = sum(times[next(iter(SPEED_VARIANTS))]) / rounds
    out = {}
    for name, values in times.items():
        mean = sum(values) / len(values)
        out[name] = {"seconds_per_update": mean, "ratio_to_before": mean / before, "seconds": values,
                     "forward_equivalents": work[name].get("fe_total"),
                     "phases": {k[8:]: v for k, v in work[name].items() if k.startswith("seconds_")}}
    return out


def speed_markdown(results: dict[str, dict]) -> str:
    """One table per model: seconds per generator update by variant and the ratio to 'before'."""
    lines = ["## Speed of one generator update, side by side (same model, same process)", ""]
    for model, variants in results.items():
        lines += [f"**{model}**", "", "| variant | s / update | / before | FE / update |", "| --- | --- | --- | --- |"]
        for name, r in variants.items():
            lines.append(f"| {name} | {r['seconds_per_update']:.3f} | {r['ratio_to_before']:.2f} | "
                         f"{r['forward_equivalents'] or 0:.1f} |")
        lines.append("")
    return "\n".join(lines)


def run_speed_benchmark(models: tuple[str, ...] = ("builtin:tiny-sd15", "builtin:tiny-sdxl", "builtin:mnist"),
                        rounds: int = 4, threads: int = 2) -> dict[str, dict]:
    """compare_speed on small CPU models: the demo teacher with the demo's settings, tiny SD1.5 / SDXL with
    LoRA rank 4, batch 2, five fake updates."""
    import torch

    from ..demo.experiment import BASE_SETTINGS
    from ..demo.worlds import flow_timesteps_matching_sdxl
    from ..trainer.api import load_teacher
    from ..trainer.config import config_from_dict
    from ..trainer.loop import DecoupledDMDTrainer

    torch.set_num_threads(threads)
    results = {}
    for model in models:
        output_dir = tempfile.mkdtemp(prefix="dmd-speed-")
        if model == "builtin:mnist":
            values = dict(BASE_SETTINGS, student_timesteps=flow_timesteps_matching_sdxl(4), guidance_scale=3.0)
            values.pop("log_with", None)
        else:
            values = dict(network_dim=4, network_alpha=4.0, train_batch_size=2, fake_updates_per_step=5)
        config = config_from_dict(dict(values, pretrained_model_name_or_path=model, output_dir=output_dir,
                                       log_with="none", max_train_steps=1000))
        adapter = load_teacher(model)
        trainer = DecoupledDMDTrainer(config, adapter, ["a photo of the cat", "a red house",
                                                        "a handwritten digit seven", "a handwritten digit one"])
        logger.info("speed: %s", model)
        results[model] = compare_speed(trainer, rounds=rounds, warmup=1)
    return results
