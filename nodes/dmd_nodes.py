"""The ComfyUI nodes (V1 dict API): schema, type conversion, one call into trainer/.

Node ids are frozen once released (saved workflows name them): DecoupledDMD_<Name>. Nothing here imports ComfyUI
at module level, so CI can import these classes and check their schemas; `comfy` and `folder_paths` are imported
inside the node functions, which only run inside ComfyUI.
"""

from __future__ import annotations

import logging
import os

from ..trainer.adapters import comfy as comfy_adapter
from ..trainer.config import (
    BOUNDS,
    LR_SCHEDULERS,
    MAX_RESOLUTION,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    REGULARIZERS,
    RENOISE_SCHEDULES,
    SAMPLING_SEED,
    UPDATE_NORMALIZATIONS,
    resolution_problem,
)
from ..trainer.outputs import MetricsLog
from . import runtime

logger = logging.getLogger(__name__)

TRAIN_CATEGORY = "training/decoupled_dmd"
SAMPLING_CATEGORY = "sampling/decoupled_dmd"
MIN_RESOLUTION = 64  # the node's own floor (the trainer's, config.MIN_RESOLUTION, is 8: the tiny test models)
DEFAULT_PROMPTS = "a photo of a cat sitting on a windowsill\na watercolor painting of a lighthouse at dusk\n" \
                  "a portrait of an old fisherman, dramatic light\na bowl of ramen, studio photograph"


def check_resolution(resolution: int) -> str | None:
    """The trainer's size rule (config.resolution_problem) with the node's floor and its 0 = the model's own."""
    if resolution == 0 or resolution_problem(resolution, resolution, low=MIN_RESOLUTION) is None:
        return None
    return (f"resolution {resolution}: use 0 (the model's default: SD1.5 512, SDXL 1024) or a multiple of 8 "
            f"between {MIN_RESOLUTION} and {MAX_RESOLUTION}")


def timesteps_problem(timesteps) -> str | None:
    """What is wrong with a typed timestep grid (None: nothing, or empty: the node's other source applies)."""
    if isinstance(timesteps, str) and timesteps.strip():
        try:
            runtime.parse_timesteps(timesteps)
        except ValueError as error:
            return str(error)
    return None


def check_output_name(output_name) -> str | None:
    name = output_name.strip() if isinstance(output_name, str) else ""
    if not name or any(c in name for c in "/\\:") or name in (".", ".."):
        return f"output_name {output_name!r}: a plain name without folders, e.g. dmd_student"
    return None


def save_name_problem(lora_name=None, checkpoint_name=None) -> str | None:
    """What is wrong with Save Distilled's file names (None: nothing): the one check its validation and the Train
    node's start both use."""
    for name, what in ((lora_name, "lora_name"), (checkpoint_name, "checkpoint_name")):
        if isinstance(name, str):
            try:
                runtime.check_file_name(name, what)
            except ValueError as error:
                return str(error)
    return None


def downstream_problem(prompt: dict, train_id) -> str | None:
    """A pack node fed by this Train node (in the queued API-format prompt) that ComfyUI would drop for a bad
    input: a Save Distilled with a file name that leaves its models folder, a Few-Step Sampler with bad timesteps.
    Said before training, since ComfyUI trains for the other outputs and that output would never be written
    (pure: tested without ComfyUI)."""
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        fed = any(isinstance(value, list) and value[:1] == [str(train_id)] for value in inputs.values())
        if not fed:
            continue
        if node.get("class_type") == "DecoupledDMD_SaveDistilled":
            problem = save_name_problem(inputs.get("lora_name") if inputs.get("save_lora", True) else None,
                                        inputs.get("checkpoint_name") if inputs.get("save_checkpoint") else None)
            what = "Save Distilled"
        elif node.get("class_type") == "DecoupledDMD_FewStepSampler":
            problem, what = timesteps_problem(inputs.get("timesteps")), "Few-Step Sampler"
        else:
            continue
        if problem:
            return (f"{what} (node {node_id}) would not run: {problem}. ComfyUI leaves that node out of the run, so "
                    "nothing is trained until it is fixed")
    return None


def _input_file(name: str) -> str:
    """A prompt file inside ComfyUI's input folder (no `..`, no absolute path)."""
    import folder_paths

    cleaned = name.strip().replace("\\", "/")
    if os.path.isabs(cleaned) or ".." in cleaned.split("/"):
        raise ValueError(f"prompt_file {name!r}: give a file name inside ComfyUI's input folder, without '..'")
    path = os.path.join(folder_paths.get_input_directory(), cleaned)
    if not os.path.isfile(path):
        raise ValueError(f"prompt_file {name!r} is not in ComfyUI's input folder "
                         f"({folder_paths.get_input_directory()}): put the .txt there (one prompt per line) or leave "
                         "prompt_file empty")
    return path


# The nodes' contract with the trainer: widget -> (config key, conversion of the widget's value). The Train node
# holds what a creator sets every run; the Settings node the method's expert knobs (its defaults are the trainer's,
# chosen by dmd-benchmark: README "Which settings, and why").
TRAIN_WIDGETS = {
    "network_dim": ("network_dim", None),
    "learning_rate": ("learning_rate", None),
    "max_train_steps": ("max_train_steps", None),
    "resolution": ("resolution", lambda v: v or ""),  # 0: the model's default
    "batch_size": ("train_batch_size", None),
    "seed": ("seed", None),
    "preview_every": ("sample_every_n_steps", None),
    "network_weights": ("network_weights", lambda v: _lora_file(v)),
}
SETTINGS_WIDGETS = {
    "renoise_schedule": ("renoise_schedule", None),
    "regularizer": ("regularizer", None),
    "update_normalization": ("update_normalization", None),
    "network_alpha": ("network_alpha", None),
    "fake_updates_per_step": ("fake_updates_per_step", None),
    "min_timestep": ("min_timestep", None),
    "max_timestep": ("max_timestep", None),
    "gradient_checkpointing": ("gradient_checkpointing", None),
    "mixed_precision": ("mixed_precision", lambda v: runtime.device_precision() if v == "auto" else v),
    "optimizer": ("optimizer_type", None),
    "save_every": ("save_every_n_steps", None),
    "resume": ("resume", lambda v: "latest" if v else ""),
    "student_ema_decay": ("student_ema_decay", None),
    "lr_scheduler": ("lr_scheduler", None),
    "regression_loss_weight": ("regression_loss_weight", None),
    "regression_pairs": ("regression_pairs", None),
}
# Settings widgets that are not a config key of their own: how the Train node uses them.
SETTINGS_EXTRA = ("fake_lr_ratio", "timesteps", "preview_prompts")
GUIDANCE_CHOICES = ["auto", "1.5", "1.75", "2", "2.5", "3", "3.5", "4", "4.5", "5", "6", "7", "8", "9", "10", "12"]

NO_LORA = "[None]"


def _lora_names() -> list[str]:
    """The LoRAs in ComfyUI's models/loras (none when the schema is read without ComfyUI, as in CI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return [name for name in folder_paths.get_filename_list("loras") if name.lower().endswith(".safetensors")]


def _lora_file(name: str) -> str:
    """The full path of a LoRA in models/loras; '' for none."""
    if not name or name == NO_LORA:
        return ""
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if not path:
        raise ValueError(f"network_weights {name!r} is not in models/loras; pick a LoRA from the list or {NO_LORA}")
    return path


def _config_default(key: str):
    from ..trainer.config import KEYS

    return KEYS[key].default


def _config_values(widgets: dict, table: dict) -> dict:
    """Config values of the widgets a node table names (TRAIN_WIDGETS, SETTINGS_WIDGETS), converted."""
    return {key: convert(widgets[widget]) if convert else widgets[widget]
            for widget, (key, convert) in table.items() if widget in widgets}


def train_config_values(widgets: dict, settings: dict | None = None) -> dict:
    """Config values from the Train node's widget values and a Settings node's output (pure: tested without
    ComfyUI); the node adds the output folder and what the teacher decides (guidance, unconditional input)."""
    settings = dict(settings) if settings is not None else Settings.defaults()
    extra = {key: settings.pop(key) for key in SETTINGS_EXTRA if key in settings}
    values = _config_values(widgets, TRAIN_WIDGETS)
    values.update(settings)
    values["fake_learning_rate"] = values.get("learning_rate", _config_default("learning_rate")) * \
        extra.get("fake_lr_ratio", 1.0)
    timesteps = extra.get("timesteps", "").strip()
    values.update(output_name=widgets["output_name"].strip(), log_with="none",
                  student_timesteps=runtime.parse_timesteps(timesteps) if timesteps
                  else runtime.trailing_timesteps(widgets["steps"]))
    return values


def preview_prompt_lines(settings: dict | None) -> list[str] | None:
    """The Settings node's preview prompts; None: the first training prompts."""
    return read_prompt_lines((settings or {}).get("preview_prompts", "")) or None


def _training_prompts(prompts: str, prompt_file: str) -> list[str]:
    """The Train node's prompts: its text box, then the lines of its prompt file (in ComfyUI's input folder)."""
    training_prompts = read_prompt_lines(prompts)
    if prompt_file.strip():
        from ..trainer.api import read_text

        training_prompts += read_prompt_lines(read_text(_input_file(prompt_file), "prompt_file"))
    if not training_prompts:
        raise ValueError("no training prompts: write some in `prompts` (one per line) or give a prompt_file")
    return training_prompts


def step_text(step: int, total: int, logs: dict) -> str:
    """The Train node's text while it trains: step, loss, speed and the time left."""
    seconds = float(logs.get("seconds_per_step", 0.0) or 0.0)
    left = max(0, total - step) * seconds
    eta = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return (f"step {step}/{total} · loss {float(logs.get('loss_generator', float('nan'))):.4f} · "
            f"{seconds:.2f} s/step · about {eta} left")


CURVES_EVENT = "decoupled_dmd.curves"  # web/decoupled_dmd.js listens for it


def curve_message(run: str, node_id, step: int, total: int, logs: dict) -> dict:
    """The websocket message of one student update that the pack's web extension draws the live curves from
    (web/curves_core.js): the run (a new queue starts the curves afresh), the node, the step, the finite values
    of the curve quantities (trainer/curves.py PANELS) and the node's step text."""
    import math

    from ..trainer.curves import PANELS

    values = {key: float(logs[key]) for _, keys in PANELS for key in keys
              if isinstance(logs.get(key), (int, float)) and math.isfinite(logs[key])}
    return {"run": run, "node": str(node_id), "step": int(step), "total": int(total), "values": values,
            "text": step_text(step, total, logs)}


class CurveHistory:
    """The curve messages of each Train node's latest run, kept in the ComfyUI process so that a page opened or
    reloaded during (or after) a run draws the curves from the start (GET /decoupled_dmd/curves; pure: tested
    without ComfyUI). Longer runs keep every other message, always the newest: at most `limit` a node."""

    def __init__(self, limit: int = 2000):
        self.limit = limit
        self.runs: dict[str, dict] = {}

    def add(self, message: dict, output_name: str = "") -> None:
        entry = self.runs.get(message["node"])
        if entry is None or entry["run"] != message["run"]:
            entry = self.runs[message["node"]] = {"run": message["run"], "output_name": output_name, "records": []}
        entry.update(total=message["total"], text=message["text"])
        entry["records"].append({"step": message["step"], "values": message["values"]})
        if len(entry["records"]) > self.limit:
            records = entry["records"]
            entry["records"] = records[::2] + ([records[-1]] if len(records) % 2 == 0 else [])

    def end(self, node_id, run: str, text: str) -> None:
        """The run's last words become the node's kept text (how it ended)."""
        entry = self.runs.get(str(node_id))
        if entry is not None and entry["run"] == run:
            entry["text"] = text

    def snapshot(self) -> dict:
        return {node: dict(entry, records=list(entry["records"])) for node, entry in self.runs.items()}


CURVE_HISTORY = CurveHistory()


STATUS_EVENT = "decoupled_dmd.status"  # how a run ended; web/decoupled_dmd.js shows it as a toast
RESTORED_POINTS = 500  # at most this many earlier updates are sent back to the curves when a run resumes


NOTHING_TRAINED = "stopped before the first update: nothing was trained or written"


def stopped_text(result) -> str:
    """The Train node's last words after Cancel (or a stop signal)."""
    if result.student_path is None:
        return NOTHING_TRAINED
    return (f"stopped after update {result.steps_done}: a resumable state is saved in {result.state_dir}. Queue "
            "again unchanged to continue")


def finished_text(result, total: int) -> str:
    """The Train node's last words after a finished run: what was trained and where each file is."""
    return (f"finished {result.steps_done}/{total} updates · student LoRA {result.student_path} · resumable state "
            f"{result.state_dir} · curves {result.metrics_file}")


def failed_text(error: BaseException) -> tuple[str, str]:
    """(outcome, text) for a run that raised: 'refused' for input to change (ValueError, the config's errors among
    them), 'failed' for a fault during the run (the last good state stays)."""
    message = str(error).strip() or type(error).__name__
    if isinstance(error, ValueError):
        return "refused", f"refused: {message}"
    return "failed", f"failed: {message}"


class NodeReporter:
    """What the Train node shows while it runs and how the run ended: ComfyUI's progress bar with the latest
    preview, a line of text on the node (what it is setting up; then step, loss and time left; then how it ended)
    and one curves message per update for the live curves the web extension draws in the node; the end also as
    a toast. Cancel becomes a stop request (the trainer saves and the node reports the interruption)."""

    def __init__(self, total: int, node_id, output_name: str = ""):
        import uuid

        import comfy.utils

        self.total, self.node_id, self.output_name = total, node_id, output_name
        self.progress = comfy.utils.ProgressBar(total, node_id=node_id)
        self.run = uuid.uuid4().hex
        try:
            from server import PromptServer

            self.server = PromptServer.instance
        except Exception:  # noqa: BLE001 - no server (a script) or an older ComfyUI: the log lines stay
            self.server = None

    def show(self, text: str) -> None:
        if self.server is not None:
            self.server.send_progress_text(text, self.node_id)

    def send(self, event: str, message: dict) -> None:
        if self.server is not None:
            self.server.send_sync(event, message, getattr(self.server, "client_id", None))

    def on_phase(self, text: str) -> None:
        logger.info("Decoupled DMD: %s", text)
        self.show(text)

    def update(self, step, preview=None) -> None:
        import comfy.model_management as mm

        try:  # ComfyUI's progress hook raises on Cancel: turn that into a stop request
            self.progress.update_absolute(step, self.total, preview)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)

    def on_preview(self, step, images) -> None:
        from ..trainer.outputs import image_grid

        self.update(step, ("PNG", image_grid(images), 512))  # every preview prompt, as the samples/ grid

    def curve(self, step: int, logs: dict) -> dict:
        message = curve_message(self.run, self.node_id, step, self.total, logs)
        CURVE_HISTORY.add(message, self.output_name)
        self.send(CURVES_EVENT, message)
        return message

    def on_step(self, step, logs) -> None:
        self.update(step)
        message = self.curve(step, logs)
        self.show(message["text"])
        if step == self.total or step % max(1, self.total // 20) == 0:  # the console gets about 20 lines a run
            logger.info("Decoupled DMD: %s", message["text"])

    def restore(self, records: list[dict], step: int) -> None:
        """A resumed run: the curves of its updates up to `step` (from the run's metrics log) come back first."""
        earlier = [record for record in records if isinstance(record.get("step"), int) and record["step"] <= step]
        stride = max(1, -(-len(earlier) // RESTORED_POINTS))
        for index, record in enumerate(earlier):
            if index % stride == 0 or index == len(earlier) - 1:
                self.curve(record["step"], record)

    def end(self, outcome: str, text: str) -> None:
        """How the run ended ('finished', 'stopped', 'refused', 'failed'): on the node, in the console, as a toast,
        and kept with the curves for a page opened later."""
        (logger.info if outcome in ("finished", "stopped") else logger.error)("Decoupled DMD: %s", text)
        self.show(text)
        CURVE_HISTORY.end(self.node_id, self.run, text)
        self.send(STATUS_EVENT, {"node": str(self.node_id), "run": self.run, "outcome": outcome, "text": text})


def read_prompt_lines(text: str) -> list[str]:
    from ..trainer.api import prompt_lines

    return prompt_lines(text)


class LoadTeacher:
    DESCRIPTION = ("Checks that MODEL is SD1.5 or SDXL (eps or v-prediction) and bundles it with its CLIP and VAE as "
                   "the teacher for Decoupled DMD. LoRAs applied to MODEL before this node are part of the teacher.")
    CATEGORY = TRAIN_CATEGORY
    RETURN_TYPES = ("DMD_TEACHER",)
    RETURN_NAMES = ("teacher",)
    OUTPUT_TOOLTIPS = ("The teacher: model, text encoders, VAE, noise schedule, guidance scale.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to distil, from Load Checkpoint "
                                           "(optionally through LoRA loaders)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder(s), from the same loader; encodes the training prompts."}),
            "vae": ("VAE", {"tooltip": "Its VAE; decodes preview samples and goes into the all-in-one checkpoint."}),
            "guidance_scale": (GUIDANCE_CHOICES, {
                "default": "auto",
                "tooltip": "CFG scale alpha of the teacher in the CFG-augmentation term (the engine of the method). "
                           "auto: the family's value from DMD2 (SDXL 8, SD1.5 1.75); the value used is in the log "
                           "and in the student's metadata."}),
            "uncond_mode": (["empty_prompt", "zeros"], {
                "default": "empty_prompt",
                "tooltip": "Unconditional input of CFG: the encoded empty prompt, or zeroed embeddings "
                           "(DMD2's SDXL choice)."}),
        }}

    def load(self, model, clip, vae, guidance_scale, uncond_mode):
        scale = None if guidance_scale == "auto" else float(guidance_scale)
        teacher = comfy_adapter.make_teacher(model, clip, vae, scale, uncond_mode)
        logger.info("Decoupled DMD teacher: %s, guidance %g (%s)", teacher.description, teacher.guidance_scale,
                    "family default" if scale is None else "set")
        return (teacher,)


class Settings:
    DESCRIPTION = ("The expert settings of Decoupled DMD: re-noising schedule, regulariser, update normalisation, fake "
                   "model, timestep range, precision, memory, saving and resuming, weight averaging, learning-rate "
                   "schedule and the regression loss. Plug into the Train node's "
                   "`settings`; without this node the Train node uses these defaults (chosen by dmd-benchmark: see "
                   "the README).")
    CATEGORY = TRAIN_CATEGORY
    RETURN_TYPES = ("DMD_SETTINGS",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Into the `settings` input of Decoupled DMD Train.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        default = _config_default
        return {"required": {
            "renoise_schedule": (list(RENOISE_SCHEDULES), {
                "default": default("renoise_schedule"),
                "tooltip": "How the CA and DM terms pick their re-noise levels (paper Table 1). decoupled-hybrid: CA "
                           "only above the student's input level, DM over the whole range (the paper's choice); "
                           "coupled-shared: one level for both (original DMD)."}),
            "regularizer": (list(REGULARIZERS), {
                "default": default("regularizer"),
                "tooltip": "Regulariser beside CFG augmentation: dm (a fake-score LoRA, DMD2), mean_variance "
                           "(cheap, no fake model), none (CA alone drifts: over-saturates)."}),
            "update_normalization": (list(UPDATE_NORMALIZATIONS), {
                "default": default("update_normalization"),
                "tooltip": "Divide each term per sample by the teacher's error at its level: per_term_cfg is DMD2's "
                           "scale for both (one more teacher call), per_term divides DM by the conditional "
                           "teacher's error, shared uses the CA scale for both, none leaves the update raw."}),
            "network_alpha": ("FLOAT", {"default": default("network_alpha"), "min": 0.01, "max": 256.0,
                                        "step": 0.01,
                                        "tooltip": "LoRA alpha of student and fake; the LoRA is scaled by "
                                                   "alpha/rank (DMD2: 8 at rank 64)."}),
            "fake_lr_ratio": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                        "tooltip": "Fake-score learning rate as a multiple of the Train node's "
                                                   "learning_rate (DMD2: 1, the same rate)."}),
            "fake_updates_per_step": ("INT", {"default": default("fake_updates_per_step"), "min": 1, "max": 20,
                                              "tooltip": "Fake-score updates per student update (TTUR; DMD2: 5)."}),
            "min_timestep": ("INT", {"default": default("min_timestep"), "min": 0, "max": 998,
                                     "tooltip": "Lowest timestep re-noising may use (DMD2: 20)."}),
            "max_timestep": ("INT", {"default": default("max_timestep"), "min": 1, "max": 999,
                                     "tooltip": "Highest timestep re-noising may use (DMD2: 980)."}),
            "timesteps": ("STRING", {"default": "",
                                     "tooltip": "Exact student timesteps, noisy to clean, e.g. 999,749,499,249. "
                                                "Empty: evenly spaced from 999 by the Train node's `steps`."}),
            "mixed_precision": (["auto", *MIXED_PRECISIONS], {
                "default": "auto",
                "tooltip": "Autocast precision. auto: bf16 where the GPU supports it (RTX 30xx and newer), else "
                           "no (fp32 compute); fp16 only on GPUs without bf16."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                   "tooltip": "Recompute UNet blocks in backward: much less memory, "
                                                              "about 30% slower."}),
            "optimizer": (list(OPTIMIZERS), {
                "default": default("optimizer_type"),
                "tooltip": "adamw (DMD2's choice) or adafactor: a fraction of AdamW's optimiser memory (full-size "
                           "SDXL UNet, LoRA rank 64: about 3 GB less), for cards that run short."}),
            "save_every": ("INT", {"default": default("save_every_n_steps"), "min": 0, "max": 100000,
                                   "tooltip": "Save the LoRA and a resumable state every N steps; 0 = at the end "
                                              "(and on Cancel)."}),
            "resume": ("BOOLEAN", {"default": True,
                                   "tooltip": "Continue an interrupted run of the same output_name and settings. A "
                                              "finished run or changed settings stop with a message (use another "
                                              "output_name for a new run). Off: start fresh."}),
            "preview_prompts": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Fixed prompts for previews, one per line; empty = the first "
                                                      "4 training prompts."}),
        }, "optional": {  # added after release: optional, so graphs saved without them load with these defaults
            "student_ema_decay": ("FLOAT", {
                "default": default("student_ema_decay"), "min": 0.0, "max": 0.9999, "step": 0.001, "round": False,
                "tooltip": "Average of the student's weights over the last updates; previews and the saved LoRA use "
                           "it. 0 = off; 0.97 averages about the last 30 updates. Steadies a student whose previews "
                           "swing from one save to the next."}),
            "lr_scheduler": (list(LR_SCHEDULERS), {
                "default": default("lr_scheduler"),
                "tooltip": "The student's learning rate over the run: constant, or a linear / cosine decay to 0 at "
                           "max_train_steps. The fake model's rate stays constant."}),
            "regression_loss_weight": ("FLOAT", {
                "default": default("regression_loss_weight"), "min": 0.0, "max": 100.0, "step": 0.1,
                "tooltip": "DMD's regression loss: the student's first step from fixed noises is pulled towards the "
                           "teacher's own CFG samples from those noises, which keeps each noise's overall look (e.g. "
                           "its background) in place. Costs regression_pairs teacher samples of 25 steps before the "
                           "first update. 0 = off; 1 in the demo."}),
            "regression_pairs": ("INT", {
                "default": default("regression_pairs"), "min": 1, "max": 4096,
                "tooltip": "Noise -> teacher-sample pairs of the regression loss, made once before the first "
                           "update (only with regression_loss_weight > 0)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, timesteps=None):
        # Only timesteps (ComfyUI files the answer under every input named here); min_timestep and max_timestep
        # keep ComfyUI's own min/max check, and their order is checked when the node runs.
        return timesteps_problem(timesteps) or True

    @classmethod
    def defaults(cls) -> dict:
        """The Settings node's output with every widget at its default: what the Train node uses without one."""
        inputs = cls.INPUT_TYPES()
        widgets = {name: spec[1]["default"] for section in ("required", "optional")
                   for name, spec in inputs[section].items()}
        return cls().settings(**widgets)[0]

    def settings(self, **widgets):
        low, high = widgets.get("min_timestep"), widgets.get("max_timestep")
        if isinstance(low, int) and isinstance(high, int) and low >= high:
            raise ValueError(f"min_timestep {low} must be below max_timestep {high}")
        values = _config_values(widgets, SETTINGS_WIDGETS)
        values.update({key: widgets[key] for key in SETTINGS_EXTRA})
        return (values,)


class Train:
    DESCRIPTION = ("Distils the teacher into a few-step student with Decoupled DMD, inside ComfyUI: student and fake "
                   "score are two LoRAs on the one loaded model; the student LoRA is always written to "
                   "output/decoupled_dmd/<output_name>/. Expert settings: plug in Decoupled DMD Settings. Cancel "
                   "saves a resumable state; queue again unchanged to continue.")
    CATEGORY = TRAIN_CATEGORY
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "DMD_STUDENT", "IMAGE", "IMAGE")
    RETURN_NAMES = ("student_model", "lora", "student", "previews", "curves")
    OUTPUT_TOOLTIPS = (
        "The teacher MODEL with the student LoRA applied: sample it with the Few-Step Sampler or KSampler "
        "(lcm, sgm_uniform, cfg 1).",
        "The student LoRA tensors (kohya keys), for LoraModelLoader / Save LoRA.",
        "The student with its metadata, for Save Distilled and the Few-Step Sampler.",
        "The last preview samples of the fixed preview prompts.",
        "Loss, gradient norm and latent mean/std curves.",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "teacher": ("DMD_TEACHER", {"tooltip": "From Load Teacher."}),
                "prompts": ("STRING", {"multiline": True, "default": DEFAULT_PROMPTS,
                                       "tooltip": "Training prompts, one per line (lines starting with # are skipped). "
                                                  "DMD needs no images."}),
                "output_name": ("STRING", {"default": "dmd_student",
                                           "tooltip": "Run name: files go to output/decoupled_dmd/<name>/ (LoRA, "
                                                      "resumable states, previews, logs). A new name starts a new "
                                                      "run."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 16,
                                  "tooltip": "Sampling steps of the student; its timesteps are evenly spaced from 999 "
                                             "(4 -> 999,749,499,249) unless the Settings node gives exact ones."}),
                "max_train_steps": ("INT", {"default": 2000, "min": 1, "max": 100000,
                                            "tooltip": "Student updates to train (a resumed run counts on)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                                       "tooltip": "Square training resolution in pixels; 0 = the model's own "
                                                  "(SD1.5 512, SDXL 1024)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Prompts per student update."}),
                "network_dim": ("INT", {"default": _config_default("network_dim"), "min": 1, "max": 256,
                                        "tooltip": "LoRA rank of student and fake (DMD2 SDXL: 64)."}),
                "learning_rate": ("FLOAT", {"default": _config_default("learning_rate"), "min": 1e-7, "max": 1e-2,
                                            "step": 1e-6, "round": False,
                                            "tooltip": "Student learning rate (DMD2 SDXL LoRA: 5e-5)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": BOUNDS["seed"].high,
                                 "tooltip": "Seed of every random draw; a resumed run continues the same sequence."}),
                "preview_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                          "tooltip": "Sample the preview prompts every N steps (shown on the "
                                                     "progress bar); 0 = only at the end."}),
            },
            "optional": {
                "settings": ("DMD_SETTINGS", {"tooltip": "From Decoupled DMD Settings (schedule, regulariser, fake "
                                                         "model, precision, saving); unconnected = its defaults."}),
                "prompt_file": ("STRING", {"default": "",
                                           "tooltip": "Optional .txt in ComfyUI's input folder with one prompt per "
                                                      "line, added to the prompts above. Empty = none."}),
                "network_weights": ([NO_LORA, *_lora_names()], {
                    "default": NO_LORA,
                    "tooltip": "Start the student from this LoRA in models/loras, e.g. a 4-step speed LoRA for this "
                               "family (DMD2, Lightning, Hyper-SD, LCM): training then adapts it to your checkpoint. "
                               "Its rank replaces network_dim; the teacher stays the model without it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, prompt_file=None):
        # ComfyUI files this answer under every input named here (execution.validate_inputs), so only the two
        # inputs that make up the training prompts are: the check that must come before the checkpoint loads.
        # resolution gets ComfyUI's own min/max check here; the rest of it and output_name at the node's start,
        # before anything trains, beside the names of the Save Distilled nodes it feeds (ComfyUI would drop one
        # with a bad name and train anyway).
        if not isinstance(prompts, str) or not isinstance(prompt_file, str):
            return True  # linked from another node: known only when the node runs
        try:
            _training_prompts(prompts, prompt_file)
        except ValueError as error:
            return str(error)
        return True

    def train(self, teacher, prompts, output_name, steps, max_train_steps, resolution, batch_size, network_dim,
              learning_rate, seed, preview_every, settings=None, prompt_file="", network_weights=NO_LORA,
              unique_id=None, prompt=None):
        widgets = dict(locals())
        import comfy.model_management as mm
        import folder_paths

        from ..trainer.config import config_from_dict

        reporter = NodeReporter(max_train_steps, unique_id, output_name.strip())
        try:
            problem = (check_resolution(resolution) or check_output_name(output_name)
                       or downstream_problem(prompt or {}, unique_id))
            if problem:
                raise ValueError(problem)
            training_prompts = _training_prompts(prompts, prompt_file)
            output_dir = os.path.join(folder_paths.get_output_directory(), "decoupled_dmd", output_name.strip())
            config = config_from_dict(dict(train_config_values(widgets, settings), output_dir=output_dir,
                                           guidance_scale=teacher.guidance_scale, uncond_mode=teacher.uncond_mode))
            result = runtime.train_in_comfyui(
                teacher, config, training_prompts, preview_prompt_lines(settings),
                should_stop=mm.processing_interrupted, on_step=reporter.on_step, on_preview=reporter.on_preview,
                on_phase=reporter.on_phase,
                on_resume=lambda step: reporter.restore(MetricsLog.of(config).read(), step))
        except mm.InterruptProcessingException:
            reporter.end("stopped", NOTHING_TRAINED)
            raise
        except Exception as error:
            reporter.end(*failed_text(error))
            raise
        if result.interrupted:
            reporter.end("stopped", stopped_text(result))
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()
        outputs = runtime.train_outputs(teacher, result)
        reporter.end("finished", finished_text(result, max_train_steps))
        return outputs


class SaveDistilled:
    DESCRIPTION = ("Saves the student LoRA into models/loras and, optionally, an all-in-one checkpoint (teacher + "
                   "student merged, CLIP, VAE) into models/checkpoints; an existing file is never overwritten.")
    CATEGORY = TRAIN_CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_path", "checkpoint_path")
    OUTPUT_TOOLTIPS = ("Where the LoRA was written (empty if not saved).",
                       "Where the checkpoint was written (empty if not saved).")
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student": ("DMD_STUDENT", {"tooltip": "From Decoupled DMD Train."}),
            "save_lora": ("BOOLEAN", {"default": True, "tooltip": "Write the LoRA into models/loras."}),
            "lora_name": ("STRING", {"default": "dmd_student_lora",
                                     "tooltip": "File name inside models/loras (.safetensors added); a counter is "
                                                "added if it exists. No '..' or absolute paths."}),
            "save_checkpoint": ("BOOLEAN", {"default": False,
                                            "tooltip": "Also write an all-in-one checkpoint (full model size)."}),
            "checkpoint_name": ("STRING", {"default": "dmd_student",
                                           "tooltip": "File name inside models/checkpoints (.safetensors added)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None):
        # Only lora_name (ComfyUI files the answer under every input named here); checkpoint_name is checked when
        # the node saves, and both are checked by the Train node that feeds it before it trains.
        return save_name_problem(lora_name=lora_name) or True

    def save(self, student, save_lora, lora_name, save_checkpoint, checkpoint_name):
        lora_path = runtime.save_lora_file(student, lora_name) if save_lora else ""
        checkpoint_path = runtime.save_checkpoint_file(student, checkpoint_name) if save_checkpoint else ""
        written = [p for p in (lora_path, checkpoint_path) if p]
        return {"ui": {"text": written}, "result": (lora_path, checkpoint_path)}


class FewStepSampler:
    DESCRIPTION = ("Samples a Decoupled DMD student at cfg 1 on the exact timesteps it was trained on: predict x0, "
                   "re-noise with fresh noise (ComfyUI's lcm sampler on those sigmas).")
    CATEGORY = SAMPLING_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The student: the train node's student_model, or a distilled "
                                               "checkpoint / teacher + student LoRA."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt (no negative: the student samples at cfg 1)."}),
                "latent_image": ("LATENT", {"tooltip": "An empty latent of the wanted size and batch."}),
                "seed": ("INT", {"default": 0, "min": SAMPLING_SEED.low, "max": SAMPLING_SEED.high,
                                 "tooltip": "Noise seed."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 16,
                                  "tooltip": "Used only when neither `student`, `timesteps` nor `metadata_file` gives "
                                             "the trained timesteps: evenly spaced from 999 (4 -> 999,749,499,249)."}),
                "timesteps": ("STRING", {"default": "",
                                         "tooltip": "Exact timesteps, e.g. 999,749,499,249; empty = from `student` or "
                                                    "`metadata_file`, else from `steps`."}),
                "metadata_file": ("STRING", {"default": "",
                                             "tooltip": "Optional student file in models/loras or models/checkpoints "
                                                        "whose metadata holds the trained timesteps."}),
            },
            "optional": {
                "student": ("DMD_STUDENT", {"tooltip": "The train node's student: its trained timesteps are used."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, timesteps=None):
        return timesteps_problem(timesteps) or True

    def sample(self, model, positive, latent_image, seed, steps, timesteps, metadata_file, student=None):
        if timesteps.strip():
            chosen = runtime.parse_timesteps(timesteps)
        elif student is not None:
            chosen = student.timesteps
        elif metadata_file.strip():
            chosen = runtime.timesteps_from_file(metadata_file.strip())
        else:
            chosen = runtime.trailing_timesteps(steps)
        return (runtime.sample_student(model, positive, latent_image, seed, chosen),)


NODE_CLASS_MAPPINGS = {
    "DecoupledDMD_LoadTeacher": LoadTeacher,
    "DecoupledDMD_Settings": Settings,
    "DecoupledDMD_Train": Train,
    "DecoupledDMD_SaveDistilled": SaveDistilled,
    "DecoupledDMD_FewStepSampler": FewStepSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DecoupledDMD_LoadTeacher": "Load Teacher (Decoupled DMD)",
    "DecoupledDMD_Settings": "Decoupled DMD Settings",
    "DecoupledDMD_Train": "Decoupled DMD Train",
    "DecoupledDMD_SaveDistilled": "Save Distilled (Decoupled DMD)",
    "DecoupledDMD_FewStepSampler": "Few-Step Sampler (Decoupled DMD)",
}
