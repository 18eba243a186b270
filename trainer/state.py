"""Resumable training states: one folder per saved step, written atomically, read back bit for bit.

A state holds what accelerate saves (optimisers, schedulers), the trained weights only (the frozen base is
never written), each process's random stream and trainer_state.json (step, counters, output names, config).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass

import toml

from .config import KEYS, ConfigError, config_from_dict, flatten_toml, portable_name_problem
from .outputs import DIR_MODE, FILE_MODE, disk_full_error, is_disk_full

logger = logging.getLogger(__name__)

STATE_PREFIX = "state-"
EMA_FILE = "student_ema_weights.safetensors"


@dataclass
class Progress:
    """How far a run is: what a state keeps beside the weights and the optimisers, and a resume restores."""

    step: int = 0
    nonfinite_skips: int = 0  # updates skipped for a non-finite gradient
    successful_updates: int = 0  # updates with every gradient finite
    output_paths: dict[str, str] | None = None  # role -> the file this run writes ("student", "checkpoint")


@dataclass(frozen=True)
class RunIdentity:
    """What a state must match to be continued: the base model (name, sha256), its family and prediction type."""

    base: dict[str, str]
    family: str
    prediction_type: str


def save_state(accelerator, config, progress: Progress, generator, identity: RunIdentity) -> str:
    """Atomically write a resumable state folder state-<step> (old ones beyond keep_last_n_states go): what
    accelerate saves (through the weight hooks), each process's `generator` state, and trainer_state.json."""
    output_dir = config.output_dir
    final = os.path.join(output_dir, f"{STATE_PREFIX}{progress.step:06d}")
    staging = os.path.join(output_dir, f".{STATE_PREFIX}{progress.step:06d}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    try:
        _write_state(accelerator, config, progress, generator, identity, staging)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error, output_dir):
            kept = list_states(output_dir)
            raise disk_full_error(final, "the partial state was removed; the last good state is "
                                  + (repr(kept[-1]) if kept else "none")) from error
        raise
    if accelerator.is_main_process:
        _open_modes(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_states(output_dir)[:-config.keep_last_n_states]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _open_modes(folder: str) -> None:
    """The modes open() and mkdir() would give (0644 / 0755 under the usual umask): some writers (accelerate's
    random states) start from 0600, which locks a state away from the other users of a shared machine."""
    for root, folders, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)
        for name in folders:
            os.chmod(os.path.join(root, name), DIR_MODE)
    os.chmod(folder, DIR_MODE)


def _write_state(accelerator, config, progress: Progress, generator, identity: RunIdentity, staging: str) -> None:
    from safetensors.torch import save_file

    accelerator.save_state(staging)
    save_file({"generator": generator.get_state()},
              os.path.join(staging, f"trainer_random_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {"step": progress.step, "nonfinite_skips": progress.nonfinite_skips,
                  "successful_updates": progress.successful_updates,
                  # file names only: a state folder is self-contained, wherever it is copied
                  "output_paths": {role: os.path.basename(path) for role, path in progress.output_paths.items()},
                  "base": identity.base, "family": identity.family, "prediction_type": identity.prediction_type,
                  "num_processes": accelerator.num_processes, "config": config.to_toml()}
        with open(os.path.join(staging, "trainer_state.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle)


# Settings a resumed run may change freely (where files go, how often it saves or previews, how fast it runs).
FREE_ON_RESUME = {"pretrained_model_name_or_path", "tokenizer_path", "output_dir", "logging_dir", "log_with", "resume",
                  "resume_changed_settings", "overwrite", "save_merged_checkpoint", "save_precision", "prompt_file",
                  "sample_prompts", "max_train_steps", "save_every_n_steps", "keep_last_n_states",
                  "sample_every_n_steps", "memory_limit_gb", "cuda_graphs", "gradient_checkpointing",
                  "mixed_precision", "max_nonfinite_updates"}
# Settings the state's weights or optimiser hold: a different value cannot continue this run.
FIXED_ON_RESUME = {"training_mode", "network_dim", "network_alpha", "lora_target_modules", "optimizer_type",
                   "learning_rate", "fake_learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "lr_warmup_steps"}


def find_state(config) -> str | None:
    """The state folder `config.resume` names (None: a fresh run, or 'latest' with no state yet)."""
    if not config.resume:
        return None
    if config.resume == "latest":
        states = list_states(config.output_dir)
        if not states:
            logger.info("resume = latest: no state in %s, starting fresh", config.output_dir)
        return states[-1] if states else None
    if not os.path.isfile(os.path.join(config.resume, "trainer_state.json")):
        found = ("does not exist" if not os.path.exists(config.resume)
                 else "is not a training state folder (no trainer_state.json)")
        raise ConfigError(f"resume: {config.resume!r} {found}; give a state-<step> folder of a run, 'latest' for "
                          f"the newest in output_dir, or leave it empty for a fresh run")
    return config.resume


def read_state_record(state_dir: str) -> dict:
    try:
        with open(os.path.join(state_dir, "trainer_state.json"), encoding="utf-8") as handle:
            record = json.load(handle)
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError("no step")
    except (OSError, ValueError) as error:
        raise ConfigError(f"resume: {state_dir!r}/trainer_state.json is damaged ({error}); resume an older state "
                          "or start a fresh run") from None
    return record


def check_resumable(config, state_dir: str | None, not_yet: tuple[str, ...] = ()) -> dict | None:
    """Refuse, before any weight loads, a resume that would silently do the wrong thing, and a fresh run that
    would replace another run's states. Returns the state's record (None for a fresh run). `not_yet`: keys the
    trainer derives later (a warm-start LoRA's rank and layers), checked again once it has."""
    if state_dir is None:
        others = list_states(config.output_dir)
        if others:
            raise ConfigError(f"output_dir {config.output_dir!r} holds another run's states "
                              f"({os.path.basename(others[-1])}); continue it with resume = 'latest', or give "
                              "this run its own output_dir (in ComfyUI: another output_name) "
                              "(a fresh run never replaces another run's states)")
        return None
    record = read_state_record(state_dir)
    try:
        saved = config_from_dict(flatten_toml(toml.loads(record.get("config", ""))))
    except (ConfigError, toml.TomlDecodeError) as error:
        raise ConfigError(f"resume: the config stored in {state_dir!r} cannot be read ({error})") from None
    changed = {name: (getattr(saved, name), getattr(config, name)) for name in KEYS
               if name not in FREE_ON_RESUME and name not in not_yet and getattr(saved, name) != getattr(config, name)}
    fixed = {k: v for k, v in changed.items() if k in FIXED_ON_RESUME}
    listed = "; ".join(f"{k}: state {a!r}, now {b!r}" for k, (a, b) in (fixed or changed).items())
    if fixed:
        raise ConfigError(f"resume: {state_dir!r} was trained with other weights or optimiser settings ({listed}); "
                          "these cannot change within a run: set them back, or start a fresh run in another "
                          "output_dir (in ComfyUI: another output_name)")
    if changed and not config.resume_changed_settings:
        raise ConfigError(f"resume: the settings differ from the state's ({listed}); set them back, set "
                          "resume_changed_settings = true to continue with the new ones (CLI / TOML), or start a fresh "
                          "run in another output_dir (in ComfyUI: another output_name)")
    if changed:
        logger.warning("resume: continuing with changed settings: %s", listed)
    if record["step"] >= config.max_train_steps:
        raise ConfigError(f"resume: this run already finished ({record['step']} of max_train_steps = "
                          f"{config.max_train_steps}); raise max_train_steps to train further, or start a fresh run "
                          "in another output_dir (in ComfyUI: another output_name)")
    return record


def resume(accelerator, state_dir: str, record: dict, identity: RunIdentity, generator, output_dir: str) -> Progress:
    """Load a state written by `save_state` (checked by `check_resumable`): accelerate's part (through the weight
    hooks) and this process's `generator`; returns the run's progress (its output files in `output_dir`)."""
    from safetensors.torch import load_file

    if record.get("num_processes", 1) != accelerator.num_processes:
        raise ConfigError(f"resume: the state was written by {record['num_processes']} processes; "
                          f"resume it with the same number (now {accelerator.num_processes})")
    if record.get("family") not in (None, identity.family):
        raise ConfigError(f"resume: the state is of a {record['family']} model, the teacher is "
                          f"{identity.family}; give the teacher the run was trained on")
    if record.get("prediction_type") not in (None, identity.prediction_type):
        raise ConfigError(f"resume: the state's teacher predicts {record['prediction_type']}, this one "
                          f"{identity.prediction_type}; give the teacher the run was trained on")
    saved_hash, now = (record.get("base") or {}).get("sha256"), identity.base.get("sha256")
    if saved_hash and now and now != saved_hash:
        raise ConfigError(f"resume: the state was trained on {record['base'].get('model')!r} "
                          f"(sha256 {saved_hash[:12]}...), the teacher now is {now[:12]}...; give the same "
                          "teacher, or start a fresh run in another output_dir (in ComfyUI: another output_name)")
    # keep writing the files this run started, in this run's folder (older states stored absolute paths)
    names = {role: os.path.basename(str(path)) for role, path in (record.get("output_paths") or {}).items()}
    for name in names.values():
        if portable_name_problem(name) or not name.endswith(".safetensors"):
            raise ConfigError(f"resume: {state_dir!r}/trainer_state.json names the output file {name!r}, which is "
                              "not a plain .safetensors name; the state is damaged or was edited")
    accelerator.load_state(state_dir)
    random_file = os.path.join(state_dir, f"trainer_random_{accelerator.process_index}.safetensors")
    generator.set_state(load_file(random_file)["generator"])
    logger.info("resumed from %s at step %d", state_dir, record["step"])
    return Progress(step=record["step"], nonfinite_skips=record["nonfinite_skips"],
                    successful_updates=record.get("successful_updates", record["step"]),
                    output_paths={role: os.path.join(output_dir, name) for role, name in names.items()} or None)


def save_weights_hook(roles, trained: list[str], ema, models, weights, output_dir):
    """accelerate's save hook: the trained weights of `trained` roles and the student's EMA, not the model
    (accelerate would write the whole, possibly multi-GB, frozen UNet)."""
    from accelerate.state import PartialState
    from safetensors.torch import save_file

    weights.clear()
    if PartialState().is_main_process:
        for role in trained:
            tensors = {k: v.contiguous() for k, v in roles.trainable_state_dict(role).items()}
            save_file(tensors, os.path.join(output_dir, f"{role}_weights.safetensors"))
        if ema is not None:
            save_file(ema.state_dict(), os.path.join(output_dir, EMA_FILE))


def load_weights_hook(roles, trained: list[str], ema, models, input_dir):
    from safetensors.torch import load_file

    models.clear()
    for role in trained:
        roles.load_trainable_state_dict(role, load_file(os.path.join(input_dir, f"{role}_weights.safetensors")))
    if ema is not None:
        ema_file = os.path.join(input_dir, EMA_FILE)
        if os.path.isfile(ema_file):
            ema.load_state_dict(load_file(ema_file))
        else:  # the run was started without an EMA: the average starts at the resumed weights
            logger.warning("%s holds no student EMA; it starts from the resumed student", input_dir)
            ema.load_state_dict(roles.trainable_state_dict("student"))


def list_states(output_dir: str) -> list[str]:
    """Complete state folders in `output_dir`, oldest first."""
    return sorted(p for p in glob.glob(os.path.join(output_dir, f"{STATE_PREFIX}*"))
                  if os.path.isfile(os.path.join(p, "trainer_state.json")))
