"""High-level entry points shared by the CLI and other front ends: load a teacher, distil, sample."""

from __future__ import annotations

import logging
import os
import re

import torch

from .config import ConfigError, TrainConfig, checked_timestep_bounds, error_summary
from .denoiser import ModelAdapter
from .formats import read_student_metadata, student_format, student_timesteps
from .loop import DecoupledDMDTrainer, TrainerCallbacks
from .outputs import own_output_dir

logger = logging.getLogger(__name__)


def prompt_lines(text: str) -> list[str]:
    """The one rule for prompts written as text (a file, a node's text box): one per line, blank lines and
    # comments skipped."""
    return [line.strip() for line in text.splitlines() if _visible(line) and not line.lstrip().startswith("#")]


def _visible(line: str) -> bool:
    """Whether a line has a character that shows: a line of zero-width spaces, BOMs or other format and
    control characters is as blank as an empty one (the text encoder would see an empty prompt)."""
    import unicodedata

    return any(unicodedata.category(ch)[0] not in "CZ" for ch in line)


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped); ConfigError naming `what` for other encodings or binary files."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what}: {path!r} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(f"{what}: {path!r} holds NUL bytes; is it a text file?")
    return text


def read_prompts(source, what: str = "prompt_file") -> list[str]:
    """Prompts from a text file (`prompt_lines`' rule) or a list."""
    if isinstance(source, list):
        return [str(p) for p in source if str(p).strip()]
    if not source:
        return []
    if os.path.isdir(source):
        raise ConfigError(f"{what}: {source!r} is a folder; give a text file with one prompt per line")
    if not os.path.isfile(source):
        raise ConfigError(f"{what}: {source!r} does not exist; give a text file with one prompt per line")
    prompts = prompt_lines(read_text(source, what))
    if not prompts:
        raise ConfigError(f"{what}: {source!r} holds no prompts; write one prompt per line")
    return prompts


def load_teacher(name_or_path: str, uncond_mode: str = "empty_prompt", tokenizer_path: str = "",
                 v_parameterization: bool | None = None, dtype=torch.float32) -> ModelAdapter:
    """A single-file SD1.5/SDXL .safetensors checkpoint, a diffusers folder / hub id, or builtin:<tiny model>.

    dtype: the frozen weights' dtype (the trainer's weight dtype: loading SDXL in bf16 halves host memory)."""
    from .adapters.diffusers import DiffusersAdapter
    from .adapters.single_file import load_single_file
    from .builtins import resolve as resolve_builtin

    if not name_or_path:
        raise ConfigError("pretrained_model_name_or_path: empty; give a .safetensors checkpoint, a diffusers model "
                          "folder or builtin:tiny-sd15")
    path = resolve_builtin(name_or_path)
    if os.path.isfile(path) or path.lower().endswith(SINGLE_FILE_SUFFIXES):
        return load_single_file(path, tokenizer_path=tokenizer_path or None, v_parameterization=v_parameterization,
                                uncond_mode=uncond_mode, dtype=dtype)
    problem = teacher_source_problem(path)
    if problem:
        raise ConfigError(problem)
    if os.path.exists(path):
        try:
            return DiffusersAdapter.from_pretrained(path, uncond_mode=uncond_mode, dtype=dtype)
        except (ConfigError, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - a damaged folder: diffusers, transformers, safetensors errors
            raise ConfigError(f"{name_or_path!r}: the diffusers model folder cannot be loaded ({type(error).__name__}: "
                              f"{error_summary(error)}); a file in it is damaged or missing: copy or download it "
                              "again") from None
    try:  # a Hugging Face id
        return DiffusersAdapter.from_pretrained(path, uncond_mode=uncond_mode, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{name_or_path!r} is no local file or folder here, and loading it as a Hugging Face id "
                          f"failed ({error_summary(error, 200)}); check the path, or the id and your "
                          "connection") from None


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # read (or refused) as one file
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def teacher_source_problem(name_or_path: str) -> str | None:
    """Why the teacher cannot be found (a path that does not exist is never tried as a Hugging Face id)."""
    if name_or_path and os.path.isdir(name_or_path) and name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES):
        return (f"pretrained_model_name_or_path: {name_or_path!r} is a folder named like a checkpoint file; give "
                "the .safetensors file itself (or a diffusers model folder)")
    if not name_or_path or name_or_path.startswith("builtin:") or os.path.exists(name_or_path):
        return None
    looks_like_path = (os.path.isabs(name_or_path) or name_or_path.startswith(("~", ".")) or "\\" in name_or_path
                       or name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)
                       or not HUB_ID.match(name_or_path))
    if looks_like_path:
        return (f"pretrained_model_name_or_path: {name_or_path!r} does not exist; give an existing .safetensors "
                "checkpoint or diffusers folder (or a Hugging Face id such as org/model)")
    return None


def _schedule_before_loading(path: str):
    """The teacher's noise schedule from what a header or a config file says (None where only loading tells)."""
    from .adapters.diffusers import read_scheduler_config, schedule_from_scheduler_config
    from .schedules import DiscreteVPSchedule

    if os.path.isfile(path):
        from .formats import inspect_checkpoint

        inspect_checkpoint(path)  # SD1.5 / SDXL: the 1000-step DDPM schedule
        return DiscreteVPSchedule.scaled_linear()
    if os.path.isfile(os.path.join(path, "scheduler", "scheduler_config.json")):
        try:
            return schedule_from_scheduler_config(read_scheduler_config(path, local=True))[0]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # loading will say what is wrong with it
    return None


def preflight(config: TrainConfig, with_teacher: bool = True) -> None:
    """Every check that needs no weights, so that a bad setting fails in seconds instead of after loading:
    precision against the device, the teacher's path, its timestep range (from a single file's header), and a
    resume against its state."""
    from .state import check_resumable, find_state

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    if with_teacher:
        from .formats import refuse_pickle

        refuse_pickle(config.pretrained_model_name_or_path)
        problem = teacher_source_problem(config.pretrained_model_name_or_path)
        if problem:
            raise ConfigError(problem)
        schedule = _schedule_before_loading(config.pretrained_model_name_or_path)
        if schedule is not None:
            checked_timestep_bounds(config, schedule)
    if config.network_weights and not os.path.isfile(config.network_weights):
        found = "is a folder" if os.path.isdir(config.network_weights) else "does not exist"
        raise ConfigError(f"network_weights: {config.network_weights!r} {found}; give a .safetensors LoRA file")
    check_resumable(config, find_state(config),
                    not_yet=("network_dim", "lora_target_modules") if config.network_weights else ())


def plan_memory(config: TrainConfig, device: str | None = None):
    """The memory plan of `config` before any weight is loaded (the teacher's structure on the meta device),
    and a function that plans a changed config the same way (for the knobs). None where the teacher is not
    a file or folder this can read without loading (a hub id)."""
    from .adapters.diffusers import DiffusersAdapter
    from .builtins import resolve as resolve_builtin
    from .memory_plan import plan_training_memory, skeleton_roles

    path = resolve_builtin(config.pretrained_model_name_or_path)
    if not os.path.exists(path):
        return None, None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .loop import WEIGHT_DTYPES

    def plan_for(changed: TrainConfig):
        skeleton, sizes = DiffusersAdapter.skeleton(path, changed.v_parameterization)
        skeleton.network.to(WEIGHT_DTYPES[changed.mixed_precision])
        roles = skeleton_roles(skeleton, changed)
        height, width = changed.resolution_hw() or skeleton.default_resolution
        return plan_training_memory(skeleton, roles, changed, skeleton.latent_shape(height, width),
                                    skeleton.example_conditioning, device, sizes["text_encoders"], sizes["vae"])

    return plan_for(config), plan_for


def distill(config: TrainConfig, callbacks: TrainerCallbacks | None = None,
            adapter: ModelAdapter | None = None) -> str:
    """Run Decoupled DMD as configured; returns the path of the saved student.

    Every check that needs no weights comes first (`preflight`); without an adapter the memory plan is made,
    logged and checked against the limit before loading. The run owns output_dir from the checks to the end."""
    with own_output_dir(config.output_dir):
        return _run(config, callbacks, adapter)


def _run(config: TrainConfig, callbacks: TrainerCallbacks | None, adapter: ModelAdapter | None) -> str | None:
    preflight(config, with_teacher=adapter is None)
    prompts = read_prompts(config.prompt_file)
    if not prompts:
        raise ConfigError("prompt_file: not set; give a text file with one training prompt per line")
    sample_prompts = read_prompts(config.sample_prompts, "sample_prompts") or None
    from .loop import WEIGHT_DTYPES
    from .memory_plan import check_fits, knob_savings, memory_limit_bytes

    plan = None
    if adapter is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            plan, plan_for = plan_memory(config, device)
        except ConfigError:
            raise
        except Exception as error:  # the plan is advice: a model it cannot read still trains
            logger.info("memory plan unavailable before loading (%s: %s)", type(error).__name__, error)
        if plan is not None:
            logger.info("%s", plan.table())
            check_fits(plan, memory_limit_bytes(config, device), lambda: knob_savings(plan_for, config, plan))

    adapter = adapter or load_teacher(config.pretrained_model_name_or_path, config.uncond_mode,
                                      config.tokenizer_path, config.v_parameterization,
                                      dtype=WEIGHT_DTYPES[config.mixed_precision])
    trainer = DecoupledDMDTrainer(config, adapter, prompts, sample_prompts, callbacks=callbacks, memory_plan=plan)
    return trainer.train()


def apply_student(adapter: ModelAdapter, student_path: str, force: bool = False) -> list[int]:
    """Load a saved student into the adapter's backbone in place; returns its trained timesteps.

    A student whose metadata records its base's sha256 is refused on a base with another one (its images would
    be another model's) unless `force` (a fine-tune of that base, knowingly).

    LoRA files (kohya `lora_unet_*` or peft names) are injected as a peft adapter; a full UNet file replaces the
    weights; an all-in-one checkpoint is already the model (load it as the teacher) and only gives its timesteps.
    """
    from safetensors.torch import load_file

    from .formats import is_kohya_lora, lora_module_names, peft_from_kohya
    from .ldm_layout import UNET_PREFIX

    metadata = read_student_metadata(student_path)
    file_format = student_format(metadata)
    timesteps = student_timesteps(metadata)
    if file_format == "checkpoint":
        return timesteps
    family = metadata.get("decoupled_dmd.family")
    if family and family != adapter.family:
        raise ConfigError(f"{os.path.basename(student_path)} is a student of a {family} model; --model is "
                          f"{adapter.family}: give the base it was distilled from")
    recorded = metadata.get("decoupled_dmd.base_sha256")
    if recorded and not force:
        actual = adapter.identity().get("sha256")
        if actual and actual != recorded:
            raise ConfigError(
                f"{os.path.basename(student_path)} was distilled from "
                f"{metadata.get('decoupled_dmd.base_model') or 'another base'} (sha256 {recorded[:12]}...); this "
                f"model's weights are sha256 {actual[:12]}...: give the base it was distilled from, or force it "
                "(dmd-sample --force) to apply it to another model, such as a fine-tune of that base")
    tensors = load_file(student_path)
    network = adapter.network
    ldm_keys = adapter.unet_ldm_keys or {}
    if file_format == "lora":
        if is_kohya_lora(tensors):
            # the family's kohya paths, and LDM paths (SD1.5 students written before 2026-12-07 used them)
            state, rank, alpha = peft_from_kohya(tensors, adapter.kohya_lora_names() or {}, lora_module_names(ldm_keys))
        else:
            state = {k.removeprefix("unet."): v.float() for k, v in tensors.items()}
            try:
                rank, alpha = int(metadata["decoupled_dmd.network_dim"]), float(metadata["decoupled_dmd.network_alpha"])
            except (KeyError, ValueError):
                raise ConfigError(f"{os.path.basename(student_path)}: its decoupled_dmd.network_dim / network_alpha "
                                  "metadata is missing or damaged") from None
        _inject_lora(network, state, rank, alpha, student_path)
    else:
        if any(k.startswith(UNET_PREFIX) for k in tensors):
            from_ldm = {UNET_PREFIX + ldm: name for name, ldm in ldm_keys.items()}
            unknown = [k for k in tensors if k not in from_ldm]
            if unknown:
                raise ConfigError(f"{student_path!r} does not fit this model: unknown keys such as {unknown[:2]}")
            tensors = {from_ldm[k]: v for k, v in tensors.items()}
        reference = network.state_dict()
        network.load_state_dict({k: v.to(reference[k].dtype) if k in reference else v for k, v in tensors.items()})
    return student_timesteps(metadata)


def _inject_lora(network, state: dict[str, torch.Tensor], rank: int, alpha: float, path: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules), network,
                            adapter_name="student")
    renamed = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.student.weight")
        renamed[key] = value
    parameters = dict(network.named_parameters())
    missing = [k for k in renamed if k not in parameters]
    if missing:
        raise ConfigError(f"{path!r} does not fit this model: unknown keys such as {missing[:2]}")
    wrong = [k for k, v in renamed.items() if parameters[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"{path!r} does not fit this model: {wrong[0]} is {list(renamed[wrong[0]].shape)} in the "
                          f"file, {list(parameters[wrong[0]].shape)} in the model (a LoRA of another model?)")
    network.load_state_dict(renamed, strict=False)


@torch.no_grad()
def sample_images(adapter: ModelAdapter, prompts: list[str], seed: int, timesteps: list[int] | None = None,
                  teacher_steps: int | None = None, guidance_scale: float | None = None,
                  resolution: tuple[int, int] | None = None, device: str | None = None) -> torch.Tensor:
    """Few-step student samples (timesteps given) or teacher CFG samples (teacher_steps given), in [0, 1]."""
    from .sampling import cfg_sample, few_step_sample, student_levels

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter.place(device, torch.float32)
    height, width = resolution or adapter.default_resolution
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *adapter.latent_shape(height, width)), generator=generator).to(device)
    cond = adapter.encode_prompts(prompts).to(device)
    denoiser = adapter.denoiser()
    if teacher_steps:
        uncond = adapter.encode_prompts([""] * len(prompts)).to(device)
        latents = cfg_sample(denoiser, noise, cond, uncond, guidance_scale or adapter.default_guidance_scale,
                             teacher_steps)
    else:
        levels = student_levels(adapter.schedule, timesteps)
        latents = few_step_sample(denoiser, noise, levels, cond, generator=generator)
    return adapter.decode(latents)
