"""The node runtime: what the Decoupled DMD nodes do, over the ComfyUI adapter (trainer/adapters/comfy.py).

Train a student on a ComfyUI teacher in this process, sample it with ComfyUI's own sampler, save it with
ComfyUI's savers, and read the names and timesteps the nodes are given. ComfyUI is imported lazily, inside the
functions, so the node classes import (and CI checks their schemas) without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..trainer.adapters.comfy import Teacher, detect_family, trainable_unet
from ..trainer.api import preflight
from ..trainer.config import ConfigError, portable_name_problem
from ..trainer.formats import checkpoint_metadata, read_student_metadata, student_timesteps
from ..trainer.outputs import MetricsLog, own_output_dir
from ..trainer.schedules import DiscreteVPSchedule, parse_student_timesteps

logger = logging.getLogger(__name__)

# --- the web extension's route -------------------------------------------------------------------------------
CURVES_ROUTE = "/decoupled_dmd/curves"


def register_routes(history) -> bool:
    """GET /decoupled_dmd/curves on ComfyUI's server: each Train node's latest run's curve messages (`history`, a
    CurveHistory), for the web extension to draw after a page (re)load. A no-op outside a running ComfyUI."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or not hasattr(instance, "routes"):
        return False
    if any(getattr(route, "path", None) == CURVES_ROUTE for route in instance.routes):
        # Registered already (the pack imported twice under two names): a second GET would make aiohttp refuse
        # the whole route table when ComfyUI starts its server, so this import adds none.
        logger.warning("[Decoupled DMD] %s is registered already; not adding it again", CURVES_ROUTE)
        return False
    from aiohttp import web

    @instance.routes.get(CURVES_ROUTE)
    async def curves(request):  # noqa: ARG001 - aiohttp hands every handler its request
        return web.json_response(history.snapshot())

    return True


# --- the node entry points ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    student_path: str | None  # the kohya LoRA the trainer wrote (with metadata); None: stopped before any update
    state_dir: str | None
    steps_done: int
    timesteps: list[int]
    metadata: dict[str, str]
    previews: Tensor | None  # (B, 3, H, W) in [0, 1]
    metrics_file: str
    interrupted: bool = False


def train_in_comfyui(teacher: Teacher, config, prompts: list[str], sample_prompts: list[str] | None = None,
            should_stop=lambda: False, on_step=lambda step, logs: None, on_preview=lambda step, images: None,
            on_phase=lambda text: None, on_resume=lambda step: None) -> TrainResult:
    """Run the Decoupled DMD trainer on a ComfyUI teacher in this process; adapters are removed afterwards."""

    import comfy.model_management as mm
    from safetensors import safe_open

    from ..trainer.loop import DecoupledDMDTrainer, TrainerCallbacks, build_accelerator, list_states

    previews: dict[str, Tensor] = {}

    def keep_preview(step, images):
        previews["last"] = images.detach().float().cpu()
        on_preview(step, images)

    stopped = {"flag": False}

    def stop():
        stopped["flag"] = stopped["flag"] or bool(should_stop())
        return stopped["flag"]

    callbacks = TrainerCallbacks(should_stop=stop, on_step=on_step, on_preview=keep_preview, on_phase=on_phase,
                                 on_resume=on_resume)
    with own_output_dir(config.output_dir):
        preflight(config, with_teacher=False)  # a resume that cannot continue fails before the UNet is prepared
        on_phase("loading the teacher's UNet for training")
        with torch.inference_mode(False), trainable_unet(teacher) as adapter:
            accelerator = build_accelerator(config, cpu=mm.get_torch_device().type == "cpu", trackers=False)
            trainer = DecoupledDMDTrainer(config, adapter, prompts, sample_prompts, accelerator=accelerator,
                                          callbacks=callbacks)
            path = trainer.train()
            steps = trainer.step
            states = list_states(config.output_dir)
            del trainer, accelerator
    if path is None:  # stopped before the first update: nothing was written
        return TrainResult(None, None, steps, [int(t) for t in config.student_timesteps], {}, None, "", True)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    return TrainResult(path, states[-1] if states else None, steps, [int(t) for t in config.student_timesteps],
                       metadata, previews.get("last"), MetricsLog.of(config).path, stopped["flag"])


def train_outputs(teacher: Teacher, result: TrainResult) -> tuple:
    """The Train node's outputs: student MODEL, LORA, DMD_STUDENT, preview IMAGE and curves IMAGE (BHWC)."""
    import comfy.utils

    from ..trainer.curves import draw_curves

    student = Student(teacher, result.student_path, result.metadata, result.timesteps)
    model = student_model(teacher.model, result.student_path)
    lora = comfy.utils.load_torch_file(result.student_path, safe_load=True)
    previews = result.previews if result.previews is not None else torch.zeros(1, 3, 64, 64)
    curves = draw_curves(MetricsLog(os.path.dirname(result.metrics_file)).read())[None]
    return model, lora, student, previews.movedim(1, -1), curves.movedim(1, -1)


def student_model(model, lora_path: str, strength: float = 1.0):
    """The teacher MODEL with the student LoRA applied, as LoraLoader would (a new clone; input untouched)."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    student, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return student


def student_sigmas(model, timesteps: list[int]) -> Tensor:
    """The k-diffusion sigmas of the student's exact trained timesteps, then 0 (for SamplerCustom / lcm)."""
    sampling = model.get_model_object("model_sampling")
    schedule = DiscreteVPSchedule.from_k_sigmas(sampling.sigmas.detach().cpu().double())
    levels = torch.tensor([float(schedule.level(t)) for t in timesteps], dtype=torch.float64)
    sigmas = schedule.k_sigma(levels).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_student(model, positive, latent: dict, seed: int, timesteps: list[int]) -> dict:
    """Few-step sampling at cfg 1 with the trained timesteps: ComfyUI's lcm sampler on the exact sigmas
    (predict x0, re-noise with fresh noise), which is the trainer's own few-step sampler."""
    import comfy.sample
    import comfy.samplers

    detect_family(model)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = student_sigmas(model, timesteps)
    sampler = comfy.samplers.ksampler("lcm")
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive, [], samples,
                                     noise_mask=latent.get("noise_mask"), seed=seed, disable_pbar=False)
    result = dict(latent)
    result["samples"] = out
    return result


# --- students, files, timesteps -----------------------------------------------------------------------------
@dataclass
class Student:
    """The train node's result, handed to Save Distilled and the Few-Step Sampler."""

    teacher: Teacher
    lora_path: str
    metadata: dict[str, str]
    timesteps: list[int]


def check_file_name(name: str, what: str = "file name") -> str:
    """A relative name inside a models folder: no absolute path, no `..`; adds .safetensors if missing."""
    import os

    cleaned = (name or "").strip().replace("\\", "/")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"{what} is empty; write a name such as my_student")
    if cleaned.startswith("/") or os.path.isabs(cleaned) or ":" in parts[0] or ".." in parts:
        raise ValueError(f"{what} {name!r} must stay inside its models folder: write a plain name such as "
                         "my_student or sub/my_student, without '..' or an absolute path")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        problem = portable_name_problem(part, reserve=len("_00001_.safetensors") if last else 0)
        if problem:
            raise ValueError(f"{what}: {problem}")
    joined = "/".join(parts)
    return joined if joined.lower().endswith(".safetensors") else joined + ".safetensors"


def _models_path(folder: str, name: str, what: str) -> str:
    import os

    import folder_paths

    relative = check_file_name(name, what)
    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    path = os.path.abspath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{what} {name!r} leaves models/{folder}; write a plain name")
    return path


def save_lora_file(student: Student, name: str) -> str:
    """Copy the student LoRA (kohya keys + metadata) into models/loras; an existing file gets a counter."""
    import shutil

    from ..trainer.outputs import atomic_write

    path = _models_path("loras", name, "lora_name")
    return atomic_write(path, lambda staging: shutil.copyfile(student.lora_path, staging))


def save_checkpoint_file(student: Student, name: str) -> str:
    """The teacher (with its own LoRAs) plus the student merged, CLIP and VAE, by ComfyUI's own checkpoint saver,
    into models/checkpoints (LDM layout, `v_pred` for v-prediction models)."""
    import comfy.sd

    from ..trainer.outputs import atomic_write

    path = _models_path("checkpoints", name, "checkpoint_name")
    model = student_model(student.teacher.model, student.lora_path)
    metadata = checkpoint_metadata(student.metadata)
    return atomic_write(path, lambda staging: comfy.sd.save_checkpoint(
        staging, model, clip=student.teacher.clip, vae=student.teacher.vae, metadata=metadata))


def parse_timesteps(text: str) -> list[int]:
    """'999, 749, 499, 249' -> [999, 749, 499, 249]: the one grid reader, and SD's 1000-step range."""
    values = parse_student_timesteps(text, "timesteps")
    if values[0] > 999:
        raise ValueError(f"timesteps {text!r}: SD1.5 / SDXL timesteps run from 999 (noisy) to 0, e.g. 999,749,499,249")
    return values


def device_precision() -> str:
    """The Train node's `auto` precision: bf16 where the GPU has it, else full fp32 compute."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def trailing_timesteps(steps: int) -> list[int]:
    """The evenly spaced grid from 999 ('trailing' spacing, ComfyUI's `simple`): 4 -> [999, 749, 499, 249]."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps {steps}: need 1..1000")
    return [int(999 - i * 1000 / steps) for i in range(steps)]


def timesteps_from_file(name: str) -> list[int]:
    """decoupled_dmd.student_timesteps of a file in models/loras or models/checkpoints."""
    import folder_paths

    for folder in ("loras", "checkpoints"):
        path = folder_paths.get_full_path(folder, name)
        if path:
            try:
                return student_timesteps(read_student_metadata(path))
            except ConfigError as error:
                raise ValueError(f"{name!r}: {error}; give the timesteps or steps instead") from None
    raise ValueError(f"metadata_file {name!r} is in neither models/loras nor models/checkpoints")
