"""Training configuration: one frozen dataclass, kohya-style TOML in and out, strict validation.

TOML sections are cosmetic (kohya's habit): every key is flat snake_case and means the same in any section.
Unknown keys and bad values fail here, before any model is loaded, naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields

import toml

from . import builtins, tiny_models  # noqa: F401 - tiny_models registers the tiny built-in teachers
from .errors import ConfigError  # defined there, re-exported here: `from .config import ConfigError` works
from .losses import GENERATOR_STEP_WEIGHTINGS, REGULARIZERS, UPDATE_NORMALIZATIONS
from .schedules import LR_SCHEDULERS, RENOISE_SCHEDULES, parse_student_timesteps

TRAINING_MODES = ("lora", "full")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
UNCOND_MODES = ("empty_prompt", "zeros")
FAKE_LOSS_TARGETS = ("native", "x0")
LOG_WITH = ("auto", "tensorboard", "none")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adafactor")


MAX_ALPHA_RATIO = 16  # network_alpha / network_dim beyond this is a typo, not a setting (LoRA scale 16x)


@dataclass(frozen=True)
class Bounds:
    """The range a numeric key accepts: `low` (excluded with `low_open`) to `high` (excluded with `high_open`).
    `why` says what is typical past `high`; `note` is added to a value below `low`. The CLI, the nodes' widgets
    (whose ranges must lie inside) and validation read this one table, `BOUNDS`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    note: str = ""

    def contains(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The range in words, for the README's table: `> 0`, `0 .. 1024`, `[0, 1)`."""
        low = None if self.low is None else _number(self.low)
        high = None if self.high is None else _number(self.high)
        if self.high_open:
            return f"[{low}, {high})"
        if low is not None and high is not None:
            return f"{'> ' + low + ' and <=' if self.low_open else low + ' ..'} {high}"
        return f"{'>' if self.low_open else '>='} {low}" if low is not None else f"<= {high}"

    def problem(self, value) -> str | None:
        """Why `value` is out of range (None: it is in range, or unset)."""
        if value is None or self.contains(value):
            return None
        if self.high_open:
            return f"{value!r} must be in [{_number(self.low)}, {_number(self.high)})"
        if self.low is not None and self.high is not None and not self.low_open and not self.why:
            return f"{value} must be in {_number(self.low)} .. {_number(self.high)}"
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return f"{value!r} must be {'>' if self.low_open else '>='} {_number(self.low)}{self.note}"
        return f"{value!r} is beyond {_number(self.high)}{'; ' + self.why if self.why else ''}"


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


class OptionalFloat(float):
    """Value type of a float key whose empty value means a default chosen later (None)."""


class OptionalBool(int):
    """Value type of a true/false key whose empty value means "detect it" (None)."""


class Size(str):
    """Value type of a size: an int (square) or 'width,height' text."""


class PathOrList(str):
    """Value type of a key that takes a file path or a list of strings."""


def _key(default, help: str, choices: tuple | None = None, section: str = "training", value_type: type | None = None):
    """A config key: its default, help text, allowed values, TOML section and value type (the default's own type,
    unless `value_type` names one of `_VALUE_TYPES` for keys whose default is empty or whose values take two
    forms)."""
    meta = {"help": help, "choices": choices, "section": section, "value_type": value_type or type(default)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # --- model and files ---
    pretrained_model_name_or_path: str = _key(
        "", "Teacher: a single-file SD1.5/SDXL .safetensors checkpoint, a diffusers folder or Hugging Face id "
        "(SD1.5/SDXL/flow UNet), or a built-in model: " + builtins.describe() + ".",
        section="model")
    tokenizer_path: str = _key(
        "", "Folder with the CLIP BPE files vocab.json and merges.txt for single-file checkpoints (e.g. "
        "openai/clip-vit-large-patch14, ComfyUI's comfy/sd1_tokenizer); empty looks in the Hugging Face cache.",
        section="model")
    v_parameterization: bool | None = _key(
        None, "Single-file checkpoints: true = v-prediction, false = epsilon; empty detects it (a `v_pred` key).",
        section="model", value_type=OptionalBool)
    output_dir: str = _key("output", "Folder for the student, training states, samples and logs.", section="model")
    output_name: str = _key("dmd_student", "Base name of the saved student files.", section="model")
    prompt_file: str = _key("", "Text file with one training prompt per line (DMD needs no images).", section="model")
    sample_prompts: str | list = _key(
        "", "Prompts for preview grids: a text file path or a TOML list; empty uses the first 4 training prompts.",
        section="model", value_type=PathOrList)
    logging_dir: str = _key("", "TensorBoard and JSONL log folder; empty means <output_dir>/logs.", section="model")
    log_with: str = _key("auto", "Tracker: auto (TensorBoard if installed), tensorboard, none. JSONL is always "
                         "written.", LOG_WITH, section="model")
    resume: str = _key("", "Resume from a training state folder, or 'latest' for the newest in output_dir. A state "
                       "of another teacher, rank, targets or optimiser settings is refused; one with other method "
                       "settings too, unless resume_changed_settings.", section="model")
    resume_changed_settings: bool = _key(
        False, "Resume even though method settings (guidance, schedule, timesteps, batch, resolution...) differ "
        "from the state's; the run continues with the new ones.", section="model")
    network_weights: str = _key(
        "", "A LoRA file to start the student from (kohya, diffusers/peft or ComfyUI layout), e.g. a speed LoRA "
        "for this family: its rank becomes network_dim, its modules join the targets, its scales are kept exactly; "
        "the teacher stays the model without it.", section="model")
    save_merged_checkpoint: bool = _key(
        False, "Also write <output_name>_checkpoint.safetensors: the input single-file checkpoint with the student "
        "merged into its UNet (same layout and dtype; loads in CheckpointLoaderSimple).", section="model")
    save_precision: str = _key("fp16", "dtype of the saved LoRA / full UNet: float, fp16 or bf16 (the merged "
                               "checkpoint keeps the input file's dtype).", SAVE_PRECISIONS, section="model")
    overwrite: bool = _key(False, "Replace existing output files of the same name; false adds a counter "
                           "(name_00001_.safetensors) as ComfyUI does.", section="model")

    # --- the method ---
    student_timesteps: list = _key(
        [999, 749, 499, 249], "Timesteps of the few-step student, noisy to clean (DMD2 4-step SDXL grid).",
        section="method")
    renoise_schedule: str = _key(
        "decoupled-hybrid", "Re-noise levels of CA and DM (paper Table 1).", RENOISE_SCHEDULES, section="method")
    min_timestep: int = _key(20, "Lowest timestep re-noising may use (DMD2: 20).", section="method")
    max_timestep: int = _key(980, "Highest timestep re-noising may use (DMD2: 980).", section="method")
    guidance_scale: float | None = _key(
        None, "CFG scale alpha of the CA term; empty uses the family default (SDXL 8, SD1.5 1.75 as DMD2, else 5).",
        section="method", value_type=OptionalFloat)
    cfg_augmentation: bool = _key(
        True, "Use the CA engine. false with regularizer = dm reproduces the paper's DM-only ablation.",
        section="method")
    regularizer: str = _key("dm", "Regulariser beside CA: dm (fake model), mean_variance (Eq. 7), none.",
                            REGULARIZERS, section="method")
    mean_variance_target_mean: float = _key(0.075, "Eq. 7 target per-image mean (SDXL latents: 0.075).",
                                            section="method")
    mean_variance_target_var: float = _key(0.81, "Eq. 7 target per-image variance (SDXL latents: 0.81).",
                                           section="method")
    mean_variance_weight: float = _key(1.0, "Weight of the Eq. 7 loss.", section="method")
    timestep_shift: float = _key(
        1.0, "Flow teachers with a timestep shift (SD3, Flux, Lumina, Z-Image: e.g. 3): sample tau_CA ~ U(t_pre, 1], "
        "tau_DM and the fake model's levels ~ U(0, 1] in pre-shift level, then shift each (shift * s / (1 + (shift - "
        "1) * s) on s = 1 - level), as the Z-Image authors do; student_timesteps stay the model's own (shifted) "
        "timesteps. 1 = no shift.", section="method")
    update_normalization: str = _key(
        "per_term", "Divide each term by the teacher's error at its own level: CA by mean|x - x0_cfg(tau_CA)| (DMD2's "
        "scale), DM by mean|x - x0_cond(tau_DM)| (per_term) or by DMD2's mean|x - x0_cfg(tau_DM)| (per_term_cfg, one "
        "more teacher call); both by the CA scale (shared, DMD2 with coupled levels); or none.",
        UPDATE_NORMALIZATIONS, section="method")
    regression_loss_weight: float = _key(
        0.0, "DMD's regression loss (Yin et al. 2024; MSE in x0 here, not LPIPS): the student's first step from a "
        "fixed noise is pulled towards the teacher's own CFG sample from that noise (deterministic DDIM, "
        "regression_teacher_steps), over regression_pairs pairs made once before the first update. It anchors which "
        "noise lands in which mode, what neither the prompt nor a score difference pins down (the texture world's "
        "unnamed background grey). One more student forward and backward per update. 0 = off.", section="method")
    regression_pairs: int = _key(128, "Noise -> teacher-sample pairs of the regression loss (made once: "
                                 "pairs x regression_teacher_steps x 2 teacher calls).", section="method")
    regression_teacher_steps: int = _key(25, "DDIM steps of the teacher's CFG samples for the regression loss.",
                                         section="method")
    generator_step_weighting: str = _key(
        "x0", "How the student's steps weigh against each other in its loss: x0 (Algorithm 1: each step's update "
        "alike in x0 space, so an eps model's first step gets ~20x the gradient of its last on SDXL's schedule) or "
        "prediction (each step's update measured in the model's own output: eps / v / flow).",
        GENERATOR_STEP_WEIGHTINGS, section="method")
    dmd_loss_weight: float = _key(1.0, "lambda of the proxy loss ||x - sg(x + lambda * Delta)||^2.", section="method")
    fake_updates_per_step: int = _key(5, "Fake-model updates per generator update (TTUR; DMD2: 5).", section="method")
    student_ema_decay: float = _key(
        0.0, "Exponential moving average of the student's weights: previews, evaluation and the saved student use "
        "the average, training the raw weights. 0 = off; 0.97 averages over about the last 30 updates (bias-"
        "corrected: from the first update on, over the updates so far). Reads a student whose outputs swing around "
        "their target at the centre of the swing; full mode keeps one more fp32 copy of the UNet.", section="method")
    share_generator_sample: bool = _key(
        False, "Run Algorithm 1's order (generator update, then the fake updates) and train the first fake update on "
        "the generator turn's own detached sample, as DMD2 does: saves one backward simulation and one student "
        "forward per update; changes the random stream, so a run differs from one without it.", section="method")
    batch_fake_samples: bool = _key(
        False, "Draw the student samples of all fake updates of one generator update in one batched backward "
        "simulation (at most one student call per student step instead of one per sample and step): the same "
        "distribution, another random stream; faster where the GPU waits on Python at batch 1.", section="method")
    fake_loss_target: str = _key(
        "native", "Fake denoising loss on the teacher's own objective (eps/v/flow, as DMD2) or plain x0 (Alg. 1).",
        FAKE_LOSS_TARGETS, section="method")
    uncond_mode: str = _key("empty_prompt", "Unconditional input of CFG: empty_prompt, or zeros (DMD2's SDXL choice).",
                            UNCOND_MODES, section="method")

    # --- training ---
    training_mode: str = _key("lora", "lora: student and fake are two LoRA adapters on one frozen base; "
                              "full: three full copies (small models only).", TRAINING_MODES)
    network_dim: int = _key(64, "LoRA rank (DMD2 SDXL: 64).")
    network_alpha: float = _key(8.0, "LoRA alpha (DMD2 SDXL: 8).")
    lora_target_modules: list = _key([], "Module names LoRA wraps; empty uses the model family's default.")
    max_train_steps: int = _key(2000, "Generator updates to train.")
    resolution: int | str = _key("", "Training resolution: 1024, or '1024,768' (width,height); empty = model default.",
                                 value_type=Size)
    train_batch_size: int = _key(1, "Prompts per generator update, per process.")
    learning_rate: float = _key(5e-5, "Student learning rate (DMD2 SDXL LoRA: 5e-5).")
    fake_learning_rate: float | None = _key(None, "Fake-model learning rate; empty = learning_rate.",
                                            value_type=OptionalFloat)
    optimizer_type: str = _key(
        "adamw", "Optimiser of both models. adafactor (transformers' Adafactor at a fixed lr: no first moment, "
        "second moment factored over each tensor's last two dims) keeps a fraction of AdamW's 8 bytes of state "
        "per trainable parameter, for tight memory.", OPTIMIZERS)
    weight_decay: float = _key(0.01, "Weight decay of both optimisers (AdamW: decoupled, as DMD2).")
    adam_beta1: float = _key(0.9, "AdamW beta1.")
    adam_beta2: float = _key(0.999, "AdamW beta2.")
    max_grad_norm: float = _key(10.0, "Gradient clipping norm for both models; 0 disables.")
    lr_warmup_steps: int = _key(0, "Linear warm-up steps of both learning rates.")
    lr_scheduler: str = _key(
        "constant", "The student's learning rate after the warm-up: constant, or a linear or cosine decay to 0 at "
        "max_train_steps (lands the student where its updates settle instead of wherever the last one left it). "
        "The fake model's rate stays constant: it has to keep following the student.", LR_SCHEDULERS)
    seed: int = _key(0, "Seed of every random draw (a resumed run continues the same sequence).")
    mixed_precision: str = _key("no", "Autocast precision; frozen weights are stored in it too.", MIXED_PRECISIONS)
    gradient_checkpointing: bool = _key(False, "Trade compute for memory in the UNet.")
    cuda_graphs: bool = _key(
        True, "Replay the no-grad UNet calls (backward simulation, teacher, the fake's DM prediction) as CUDA graphs: "
        "the same kernels on the current weights without Python and launch overhead (CUDA and diffusers models; "
        "ComfyUI's models run eagerly). Holds the widest no-grad call's temporaries for the run.")
    memory_limit_gb: float = _key(
        0.0, "GiB the run may use on its device. Before loading weights the memory plan (printed) estimates the "
        "peak; a run that would not fit stops there, naming the settings that would make it fit. 0 = the GPU's "
        "free memory, or on a CPU the RAM available.")
    save_every_n_steps: int = _key(250, "Save the student and a resumable state every N steps (a hard kill loses at "
                                        "most N); 0 = only at the end. An SDXL rank-64 state is 5.1 GiB, 6.5-19 s "
                                        "to write (docs/performance.md).")
    keep_last_n_states: int = _key(2, "Resumable states kept in output_dir (older ones are deleted).")
    max_nonfinite_updates: int = _key(
        10, "Stop the run (keeping its last good state) after this many updates in a row with a non-finite "
        "gradient.")
    sample_every_n_steps: int = _key(0, "Write a preview grid every N steps; 0 = only at the end.")

    def __post_init__(self):
        validate(self)

    @property
    def effective_fake_learning_rate(self) -> float:
        return self.learning_rate if self.fake_learning_rate is None else self.fake_learning_rate

    @property
    def uses_fake_model(self) -> bool:
        return self.regularizer == "dm"

    @property
    def regression_only(self) -> bool:
        """Neither DMD term, only DMD's regression loss: the control that says what the method adds to it."""
        return not self.cfg_augmentation and self.regularizer == "none" and self.regression_loss_weight > 0

    def resolution_hw(self) -> tuple[int, int] | None:
        """(height, width) from `resolution`, or None for the model's default."""
        if self.resolution in ("", None):
            return None
        width, height = _parse_resolution(self.resolution)
        return height, width

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_toml(self) -> str:
        """Kohya-shaped TOML: sections by topic, None values left out (they mean 'default')."""
        sections: dict[str, dict] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                sections.setdefault(f.metadata["section"], {})[f.name] = value
        return toml.dumps(sections)


KEYS = {f.name: f for f in fields(TrainConfig)}

_POSITIVE, _NON_NEGATIVE, _UNIT = Bounds(0, low_open=True), Bounds(0), Bounds(0.0, 1.0, high_open=True)
_TYPICAL_LR = "typical values are 1e-6 .. 1e-3"
BOUNDS: dict[str, Bounds] = {
    "network_dim": Bounds(0, 1024, low_open=True, why="LoRA ranks are 4 .. 256"),
    "network_alpha": _POSITIVE,
    "max_train_steps": _POSITIVE,
    "train_batch_size": Bounds(0, 4096, low_open=True),
    "learning_rate": Bounds(0, 1.0, low_open=True, why=_TYPICAL_LR),
    "fake_learning_rate": Bounds(0, 1.0, low_open=True, why=_TYPICAL_LR, note=", or left empty for learning_rate"),
    "guidance_scale": Bounds(1.0, 100.0, why="SDXL's CFG scales are about 5 .. 12",
                             note=" (1 turns CFG augmentation off)"),
    "mean_variance_target_var": _POSITIVE,
    "mean_variance_weight": Bounds(0, 1e4, why="the default is 1"),
    "dmd_loss_weight": Bounds(0, 1e4, why="the default is 1"),
    "fake_updates_per_step": Bounds(0, 100, why="DMD2 uses 5"),
    "timestep_shift": Bounds(0, 100.0, low_open=True, why="flow models use 1 .. 6"),
    "regression_loss_weight": _NON_NEGATIVE,
    "regression_pairs": Bounds(None, 100_000, why="DMD made 12M at SD scale; a few hundred anchor a LoRA"),
    "regression_teacher_steps": Bounds(None, 1000, why="25 .. 50 DDIM steps are plenty"),
    "keep_last_n_states": _POSITIVE,
    "max_nonfinite_updates": _POSITIVE,
    "seed": Bounds(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "lr_warmup_steps": _NON_NEGATIVE,
    "save_every_n_steps": _NON_NEGATIVE,
    "sample_every_n_steps": _NON_NEGATIVE,
    "min_timestep": _NON_NEGATIVE,
    "memory_limit_gb": _NON_NEGATIVE,
    "adam_beta1": _UNIT,
    "adam_beta2": _UNIT,
    "student_ema_decay": _UNIT,
}
# The seed of a sampler (dmd-sample, the Few-Step Sampler node): torch's generator takes 64 bits.
SAMPLING_SEED = Bounds(0, 2**64 - 1)
MIN_RESOLUTION, MAX_RESOLUTION = 8, 8192  # pixels per side, multiples of 8 (the VAE's factor)


def _parse_resolution(value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    parts = str(value).replace("x", ",").split(",")
    try:
        numbers = [int(p.strip()) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise ConfigError(f"resolution: {value!r} is not a size; write 1024 or '1024,768' (width,height)")
    return numbers[0], numbers[1]


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


def validate(config: TrainConfig) -> None:
    """Check every value; raise ConfigError naming the key and what is allowed."""
    for f in fields(config):
        choices = f.metadata["choices"]
        value = getattr(config, f.name)
        if choices and value not in choices:
            _fail(f.name, f"{value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")

    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(f.name, f"{value!r} is not a finite number")
    for key, bounds in BOUNDS.items():
        problem = bounds.problem(getattr(config, key))
        if problem:
            _fail(key, problem)
    if config.network_alpha > MAX_ALPHA_RATIO * config.network_dim:
        _fail("network_alpha", f"{config.network_alpha!r} is beyond {MAX_ALPHA_RATIO} x network_dim "
              f"({config.network_dim}): the LoRA's updates are scaled by alpha / dim = "
              f"{config.network_alpha / config.network_dim:g}; kohya and DMD2 use alpha <= dim (alpha = dim: 1)")
    if config.min_timestep >= config.max_timestep:
        _fail("min_timestep", f"{config.min_timestep} must be below max_timestep {config.max_timestep}")
    try:
        timesteps = parse_student_timesteps(config.student_timesteps)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if timesteps[-1] <= config.min_timestep:
        _fail("student_timesteps", f"the last step {timesteps[-1]} must be above min_timestep {config.min_timestep}")
    if not config.cfg_augmentation and config.regularizer != "dm" and not config.regression_only:
        _fail("cfg_augmentation", "false needs regularizer = 'dm' (the DM-only ablation), or regularizer = 'none' with "
              "regression_loss_weight > 0 (the regression-only control); otherwise nothing trains the student")
    if config.regression_loss_weight > 0:
        if config.regression_pairs < 1:
            _fail("regression_pairs", f"{config.regression_pairs} must be >= 1 with regression_loss_weight > 0")
        if config.regression_teacher_steps < 2:
            _fail("regression_teacher_steps",
                  f"{config.regression_teacher_steps} must be >= 2 (the teacher's DDIM steps)")
    if config.regularizer == "dm" and config.fake_updates_per_step < 1:
        _fail("fake_updates_per_step", "must be >= 1 with regularizer = 'dm': the fake model has to follow the student")
    if config.resolution not in ("", None):
        problem = resolution_problem(*_parse_resolution(config.resolution))
        if problem:
            _fail("resolution", problem)
    problem = portable_name_problem(config.output_name, reserve=len("_checkpoint_00001_.safetensors"))
    if problem:
        _fail("output_name", problem)
    model = config.pretrained_model_name_or_path
    if model.startswith(builtins.PREFIX) and model[len(builtins.PREFIX):] not in builtins.accepted():
        close = difflib.get_close_matches(model[len(builtins.PREFIX):], builtins.names(), n=1)
        _fail("pretrained_model_name_or_path", f"{model!r} is no built-in model"
              + (f"; did you mean 'builtin:{close[0]}'?" if close else "")
              + f" Built in: {', '.join(builtins.PREFIX + m for m in builtins.names())}")
    if config.network_weights and config.training_mode != "lora":
        _fail("network_weights", "starts a LoRA student; set training_mode = 'lora' (or leave network_weights empty)")
    if config.network_weights and not config.network_weights.lower().endswith(".safetensors"):
        _fail("network_weights", f"{config.network_weights!r}: give a .safetensors LoRA file")
    if not isinstance(config.sample_prompts, (str, list)):
        _fail("sample_prompts", "must be a file path or a list of prompts")


def resolution_problem(width: int, height: int, low: int = MIN_RESOLUTION) -> str | None:
    """Why a training or sampling size cannot be used (the VAE's factor 8, sane bounds; `low`: a front end's own
    floor), or None."""
    high = MAX_RESOLUTION
    if not (low <= width <= high and low <= height <= high) or width % 8 or height % 8:
        return f"{width}x{height} must be multiples of 8 between {low} and {high}"
    return None


def checked_timestep_bounds(config: TrainConfig, noise_schedule) -> tuple[float, float]:
    """The student timesteps and min/max_timestep checked against a teacher's noise schedule (ConfigError naming what
    is out of range, or a timestep shift on a teacher that is not a flow model); returns the re-noising level
    bounds."""
    from .schedules import FlowSchedule, check_student_timesteps, timestep_level_bounds

    if config.timestep_shift != 1.0 and not isinstance(noise_schedule, FlowSchedule):
        raise ConfigError(f"timestep_shift: {config.timestep_shift:g} is for flow-matching teachers (SD3, Flux, "
                          "Lumina, Z-Image); this teacher is an SD (DDPM) model, whose timesteps need no shift: set "
                          "it to 1")
    try:
        check_student_timesteps(noise_schedule, config.student_timesteps, config.min_timestep)
        return timestep_level_bounds(noise_schedule, config.min_timestep, config.max_timestep)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def error_summary(error: BaseException, limit: int = 300) -> str:
    """The first line of an error from another library, for a one-line message."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
NAME_BYTES = 255  # one path component on ext4, NTFS and APFS


def portable_name_problem(name, reserve: int = 0) -> str | None:
    """Why `name` is not a plain file name valid on Linux, Windows and macOS (with `reserve` bytes left for
    suffixes the product adds), or None."""
    if not isinstance(name, str) or not name.strip():
        return "empty; give a plain file name such as my_student"
    bad = sorted({c for c in name if c in '/\\:*?"<>|' or ord(c) < 32})
    if bad:
        return (f"{name!r} contains {', '.join(repr(c) for c in bad)}; a plain file name has no folders, "
                "no control characters and none of / \\ : * ? \" < > |")
    if name in (".", "..") or name.endswith((".", " ")) or name != name.strip():
        return f"{name!r}: a name cannot be . or .., start or end with a space, or end with a dot (Windows drops them)"
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        return f"{name!r} is a reserved device name on Windows; choose another"
    if len(name.encode("utf-8")) + reserve > NAME_BYTES:
        return (f"{name[:40]!r}... is {len(name.encode('utf-8'))} bytes; file names may have at most "
                f"{NAME_BYTES - reserve} here (the product adds suffixes such as _checkpoint_00001_.safetensors)")
    return None


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError


def _parse_int(value):
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _parse_float(value):
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _parse_str(value):
    if not isinstance(value, str):
        raise ValueError
    return value


# value type -> (parser, the type's name in messages)
_VALUE_TYPES = {
    bool: (_parse_bool, "bool"), int: (_parse_int, "int"), float: (_parse_float, "float"), str: (_parse_str, "str"),
    OptionalFloat: (lambda v: None if v in ("", None) else _parse_float(v), "float"),
    OptionalBool: (lambda v: None if v in ("", None) else _parse_bool(v), "bool"),
    Size: (lambda v: v if isinstance(v, int) and not isinstance(v, bool) else str(v), "size"),
    PathOrList: (lambda v: v, "path or list"),
}


def _parse_list(key: str, value):
    if key == "student_timesteps":
        try:
            return parse_student_timesteps(value)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    return [str(v) for v in items]


def _coerce(key: str, value):
    """Convert a TOML or command-line value to the key's value type, or fail naming the key."""
    f = KEYS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    value_type = f.metadata["value_type"]
    name = "list" if value_type is list else _VALUE_TYPES[value_type][1]
    try:
        return _parse_list(key, value) if value_type is list else _VALUE_TYPES[value_type][0](value)
    except ConfigError:
        raise  # already says what is wrong (a ConfigError is a ValueError: the line below would hide it)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: {value!r} is not a valid {name}; default is {default!r}")


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see the README for the list of keys"
    return f"unknown key {key!r}{hint}"


def flatten_toml(data: dict) -> dict:
    """Drop kohya's cosmetic sections: {section: {key: v}} and {key: v} both give {key: v}."""
    flat: dict = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        for key, item in items:
            if isinstance(item, dict):
                raise ConfigError(f"{name}.{key}: sections nest one level only; write {key}'s keys flat")
            if key in flat:
                raise ConfigError(f"{key}: set twice in the config file")
            flat[key] = item
    return flat


def config_from_dict(values: dict) -> TrainConfig:
    for key in values:
        if key not in KEYS:
            raise ConfigError(_unknown_key_message(key))
    return TrainConfig(**{key: _coerce(key, value) for key, value in values.items()})


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    """Read a TOML file (optional) and apply overrides (command-line flags win), then validate."""
    values: dict = {}
    if path is not None:
        try:
            values = flatten_toml(toml.load(os.fspath(path)))
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
        except toml.TomlDecodeError as error:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {error}") from None
    values.update(overrides or {})
    return config_from_dict(values)


def shown_default(name: str) -> str:
    """A key's default as TOML writes it, or (empty)."""
    f = KEYS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "(empty)" if default in ("", None, []) else toml.dumps({"v": default})[4:].strip()


def reference_markdown() -> str:
    """The README's table of keys (scripts/readme_config_table.py writes it; a test checks it is current)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in fields(TrainConfig):
        shown = shown_default(f.name)
        shown = shown if shown == "(empty)" else f"`{shown}`"
        choices = f.metadata["choices"]
        extra = f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else ""
        if f.name in BOUNDS:
            extra += f" Range: {BOUNDS[f.name].describe()}."
        lines.append(f"| `{f.name}` | {shown} | {f.metadata['help']}{extra} |")
    return "\n".join(lines)
