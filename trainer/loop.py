"""The run of Decoupled DMD on accelerate: set-up, the models on the denoiser contract, the optimizers, the
training loop, divergence, logs, previews and saving. Algorithm 1 itself lives in method.py (`DecoupledDMD`),
which reaches the run through its public methods; resumable states live in state.py, the student's files in
export.py.

Model-agnostic: it sees a `ModelAdapter` (denoiser contract) and a `Roles` object (which weights a forward
uses). Every random draw goes through one seeded torch.Generator per process that is saved with the state,
so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .accounting import CostMeter
from .config import ConfigError, TrainConfig, checked_timestep_bounds
from .denoiser import Conditioning, Denoiser, ModelAdapter, PromptCache
from .ema import StudentEma
from .errors import public_name
from .export import SAVE_DTYPES, save_merged_checkpoint, student_tensors
from .formats import atomic_save_safetensors, read_init_lora, student_metadata
from .graphs import GraphedCalls, uses_cuda_graphs
from .losses import generator_step_weights
from .method import DecoupledDMD
from .networks import FullRoles, LoraRoles, Roles, nonfinite_tensors
from .outputs import MetricsLog, free_path, logging_dir, own_output_dir, remove_stale_staging, save_image_grid
from .sampling import few_step_sample, student_levels
from .schedules import learning_rate_factor
from .state import (
    Progress,
    RunIdentity,
    check_resumable,
    find_state,
    list_states,
    load_weights_hook,
    resume,
    save_state,
    save_weights_hook,
)

logger = logging.getLogger(__name__)

PROMPT_CACHE_LIMIT = 4096  # above this many distinct prompts, encode each batch as it is drawn (still cached), and
# keep the text encoders on the device instead of encoding everything up front
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def with_init_lora(config: TrainConfig, init, adapter: ModelAdapter) -> TrainConfig:
    """The run's config with a warm-start LoRA's rank, and its layers among the targets (by full name)."""
    targets = list(config.lora_target_modules or adapter.default_lora_target_modules())
    extra = sorted(m for m in init.weights if not any(m == t or m.endswith("." + t) for t in targets))
    if config.network_dim != init.rank:
        logger.info("network_dim %d -> %d: the rank of %s", config.network_dim, init.rank, init.name)
    return config.replace(network_dim=init.rank, lora_target_modules=targets + extra if extra else
                          list(config.lora_target_modules))


@public_name
class TrainingFailed(RuntimeError):
    """A run that cannot go on (every update non-finite); the message names the likely causes and the last good
    state."""


@dataclass
class TrainerCallbacks:
    """Hooks for front ends (CLI, ComfyUI): progress, previews, and cooperative stopping between steps."""

    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[int, dict], None] = lambda step, logs: None
    on_preview: Callable[[int, Tensor], None] = lambda step, images: None
    on_phase: Callable[[str], None] = lambda text: None  # what the run is doing before and between steps
    on_resume: Callable[[int], None] = lambda step: None  # a resumed run goes on after this step (logged before)


@dataclass
class _RandomState:
    """The trainer's own random stream, saved per process with every state."""

    generator: torch.Generator = field(default_factory=torch.Generator)


def build_optimizer(config, parameters, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW (DMD2's choice), or Adafactor where memory is tight: no first moment and a row/column-factored
    second moment, with the given fixed learning rate (no relative step or parameter scaling)."""
    parameters = list(parameters)
    if config.optimizer_type == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=learning_rate, beta1=None, weight_decay=config.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.weight_decay)


def build_accelerator(config: TrainConfig, cpu: bool = False, trackers: bool = True):
    """The Accelerator of one run (the CLI's, the nodes' and the Python API's).

    A long-lived host process (ComfyUI, a test session) may train several times with different precisions;
    accelerate keeps one global state per process, so each run starts from a clean one."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision, cpu=cpu,
        log_with=_tracker(config.log_with) if trackers else None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=logging_dir(config)),
        # student and fake adapters share one module: each backward uses only one of them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )


def _progress_field(name: str) -> property:
    """A trainer attribute that reads and writes the field `name` of its `progress` (`state.Progress`)."""
    return property(lambda self: getattr(self.progress, name), lambda self, value: setattr(self.progress, name, value))


class DecoupledDMDTrainer:
    def __init__(self, config: TrainConfig, adapter: ModelAdapter, prompts: list[str],
                 sample_prompts: list[str] | None = None, accelerator=None,
                 callbacks: TrainerCallbacks | None = None, memory_plan=None):
        from accelerate.utils import set_seed

        if not prompts:
            raise ValueError("no training prompts: give at least one prompt (one per line in prompt_file)")
        self.config, self.adapter, self.prompts = config, adapter, list(prompts)
        self.sample_prompts = list(sample_prompts or self.prompts[:4])
        self.callbacks = callbacks or TrainerCallbacks()
        self.metrics_log = MetricsLog.of(config)
        self.accelerator = accelerator = accelerator if accelerator is not None else build_accelerator(config)
        if config.save_merged_checkpoint and adapter.merged_checkpoint_problem():
            raise ConfigError(adapter.merged_checkpoint_problem())
        self.progress = Progress()  # step, counters and output files: what a state keeps and a resume restores
        self._identity: RunIdentity | None = None
        if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            raise ConfigError("mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
        self.level_bounds = checked_timestep_bounds(config, adapter.schedule)
        self.levels = student_levels(adapter.schedule, config.student_timesteps)
        self.step_weights = generator_step_weights(adapter.denoising_loss_weight(
            torch.tensor(self.levels, dtype=torch.float64)), config.generator_step_weighting)
        self.guidance_scale = config.guidance_scale or adapter.default_guidance_scale
        height, width = config.resolution_hw() or adapter.default_resolution
        self.latent_shape = adapter.latent_shape(height, width)

        damaged = nonfinite_tensors(adapter.network)
        if damaged:
            raise ConfigError(f"the teacher's weights hold NaN or inf in {len(damaged)} tensors (e.g. {damaged[0]}): "
                              "the checkpoint is damaged; load an intact copy")
        self.init_lora = None
        if config.network_weights:
            self.init_lora = read_init_lora(config.network_weights, adapter.lora_aliases(), config.network_alpha,
                                            adapter.family)
            self.config = config = with_init_lora(config, self.init_lora, adapter)
        set_seed(config.seed)  # same adapter initialisation on every process
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        adapter.place(accelerator.device, self.weight_dtype)
        self.callbacks.on_phase("adding the student and fake adapters")
        self.roles = self._build_roles()
        if self.init_lora is not None:
            self.roles.load_role_lora("student", self.init_lora.weights)
            logger.info("student starts from %s (rank %d, %d layers)", self.init_lora.name, self.init_lora.rank,
                        len(self.init_lora.weights))
        self.ema = (StudentEma(self.roles.trainable_state_dict("student"), config.student_ema_decay)
                    if config.student_ema_decay else None)
        self.random = _RandomState()
        self.nonfinite_streak = 0  # updates in a row with a skipped (non-finite) gradient
        self.meter = CostMeter(config.train_batch_size, config.gradient_checkpointing,
                               torch.cuda.synchronize if accelerator.device.type == "cuda" else None)
        self._uncond_cache: dict[int, Conditioning] = {}
        self.graphs = GraphedCalls() if uses_cuda_graphs(config, adapter, accelerator.device.type) else None
        self.method = DecoupledDMD(self)  # Algorithm 1 (and the regression loss) over this run
        self.random.generator.manual_seed(config.seed * 1_000_003 + accelerator.process_index)

        self._prepare_prompts()
        self.memory_plan = memory_plan if memory_plan is not None else self._plan_memory()
        self._build_optimizers()
        hooked = (self.roles, list(self.optimizers), self.ema)  # the trained weights and the EMA go in the states
        self.accelerator.register_save_state_pre_hook(functools.partial(save_weights_hook, *hooked))
        self.accelerator.register_load_state_pre_hook(functools.partial(load_weights_hook, *hooked))

    # --- how far the run is (`state.Progress`) -------------------------------------------------------------
    step = _progress_field("step")
    nonfinite_skips = _progress_field("nonfinite_skips")
    successful_updates = _progress_field("successful_updates")
    output_paths = _progress_field("output_paths")

    def identity(self) -> RunIdentity:
        """The base model's identity (name, sha256: hashed once per run), family and prediction type."""
        if self._identity is None:
            adapter = self.adapter
            self._identity = RunIdentity(adapter.identity(), adapter.family, adapter.prediction_type)
        return self._identity

    # --- set-up --------------------------------------------------------------------------------------------
    def _build_roles(self) -> Roles:
        config, network = self.config, self.adapter.network
        if config.training_mode == "lora":
            targets = config.lora_target_modules or self.adapter.default_lora_target_modules()
            roles = LoraRoles(network, config.network_dim, config.network_alpha, targets)
            # accelerate runs every call of the prepared network under autocast in mixed precision
            roles.skip_input_casts(config.mixed_precision != "no")
        else:
            roles = FullRoles(network)
        if config.gradient_checkpointing:
            for module in set(roles.trained_modules().values()):
                self.adapter.enable_gradient_checkpointing(module)
        return roles

    def _plan_memory(self):
        """Plan this run's peak memory on the loaded model (front ends that load weights themselves, such as
        ComfyUI, get their plan here; the CLI plans before loading), log it, and stop if it does not fit."""
        from .memory_plan import (
            GIB,
            check_fits,
            knob_savings,
            memory_limit_bytes,
            plan_training_memory,
            skeleton_roles,
        )

        config, device = self.config, self.accelerator.device.type
        template = self.prompt_cache.get([""])

        def cond_for(rows: int) -> Conditioning:
            return Conditioning({k: torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device="meta")
                                 for k, v in template.tensors.items()})

        def plan_for(changed: TrainConfig):
            height, width = changed.resolution_hw() or self.adapter.default_resolution
            common = dict(text_encoder_parameters=self.adapter.text_encoder_parameters(),
                          vae_parameters=self.adapter.vae_parameters(),
                          adapter_scale=changed.network_dim / config.network_dim)
            skeleton = self.adapter.planning_skeleton()
            if skeleton is not None:  # simulate on a meta stand-in, count the real adapters
                simulate_on = (skeleton, skeleton_roles(skeleton, changed), skeleton.example_conditioning)
                return plan_training_memory(self.adapter, self.roles, changed, self.adapter.latent_shape(height, width),
                                            cond_for, device, simulate_on=simulate_on, **common)
            network = self.roles.activate("student")
            toggled = changed.gradient_checkpointing != config.gradient_checkpointing
            if toggled:
                self.adapter.enable_gradient_checkpointing(network)
            try:
                return plan_training_memory(self.adapter, self.roles, changed, self.adapter.latent_shape(height, width),
                                            cond_for, device, **common)
            finally:
                if toggled:
                    self.adapter.disable_gradient_checkpointing(network)

        try:
            plan = plan_for(config)
        except Exception as error:  # a backbone that cannot run on the meta device: train without a plan
            logger.info("memory plan unavailable for this model (%s: %s)", type(error).__name__, error)
            return None
        logger.info("%s", plan.table())
        host = self.adapter.memory_available_bytes(device)
        limit = memory_limit_bytes(config, device, host)
        if limit:
            source = ("memory_limit_gb" if config.memory_limit_gb else "the host's free memory plus the loaded UNet"
                      if host is not None else f"the {device}'s free memory")
            logger.info("memory: the plan's peak %.2f GiB against %.2f GiB available (%s)", plan.peak / GIB,
                        limit / GIB, source)
        check_fits(plan, limit, lambda: knob_savings(plan_for, config, plan))
        return plan

    def _prepare_prompts(self):
        self.prompt_cache = PromptCache(self.adapter)
        everything = self.prompts + self.sample_prompts + [""]
        if len(set(everything)) <= PROMPT_CACHE_LIMIT:
            self.callbacks.on_phase(f"encoding {len(set(everything))} prompts")
            with self.accelerator.autocast():
                self.prompt_cache.add(everything)
            self.adapter.offload_text_encoders()

    def _build_optimizers(self):
        accelerator, config = self.accelerator, self.config
        roles = ["student"] + (["fake"] if config.uses_fake_model else [])
        learning_rates = {"student": config.learning_rate, "fake": config.effective_fake_learning_rate}
        modules = self.roles.trained_modules()
        self.optimizers, self.schedulers, self.wrapped = {}, {}, {}
        prepared: dict[int, torch.nn.Module] = {}
        for role in roles:
            module = modules[role]
            if id(module) not in prepared:
                prepared[id(module)] = accelerator.prepare_model(module)
            self.wrapped[role] = prepared[id(module)]
            optimizer = build_optimizer(config, self.roles.trainable_parameters(role), learning_rates[role])
            shape = config.lr_scheduler if role == "student" else "constant"  # the fake keeps following
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
                learning_rate_factor, scheduler=shape, warmup=config.lr_warmup_steps, total=config.max_train_steps))
            self.optimizers[role] = accelerator.prepare_optimizer(optimizer)
            self.schedulers[role] = accelerator.prepare_scheduler(scheduler)

    # --- the denoisers ---------------------------------------------------------------------------------------
    def x0(self, role: str, x_t: Tensor, level: Tensor, cond: Conditioning, train: bool = False,
            work: str | None = None) -> Tensor:
        """x0 prediction of `role`; `train` routes through the data-parallel wrapper so gradients sync."""
        self.meter.forward(role, x_t.shape[0], work or ("train_forward" if train else "forward"))
        with self.accelerator.autocast():
            if train:
                self.roles.activate(role)
                return self.adapter.predict_x0(self.wrapped[role], x_t, level, cond)
            return self._call(role, x_t, level, cond)

    def _call(self, role: str, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """A call of `role` outside the data-parallel wrapper; without grad, a CUDA-graph replay where enabled."""
        network = self.roles.activate(role)
        if self.graphs is None:
            return self.adapter.predict_x0(network, x_t, level, cond)
        return self.graphs(role, functools.partial(self.adapter.predict_x0, network), x_t, level, cond)

    def denoiser(self, role: str) -> Denoiser:
        """`role` on the denoiser contract (the samplers' input)."""
        return _RoleDenoiser(self, role)

    # --- random draws ----------------------------------------------------------------------------------------
    def randn(self, batch: int) -> Tensor:
        return torch.randn((batch, *self.latent_shape), generator=self.random.generator).to(self.accelerator.device)

    def draw_batch(self) -> tuple[Conditioning, int, Tensor]:
        """Prompts (encoded), the student step to train, and the starting noise of one batch."""
        generator = self.random.generator
        batch = self.config.train_batch_size
        indices = torch.randint(len(self.prompts), (batch,), generator=generator).tolist()
        step_index = int(torch.randint(len(self.levels), (1,), generator=generator))
        cond = self.conditioning([self.prompts[i] for i in indices])
        return cond, step_index, self.randn(batch)

    def uncond(self, batch: int) -> Conditioning:
        """The unconditional input for `batch` rows, on the device, built once per batch size."""
        if batch not in self._uncond_cache:
            self._uncond_cache[batch] = self.conditioning([""] * batch)
        return self._uncond_cache[batch]

    def conditioning(self, prompts: list[str]) -> Conditioning:
        with self.accelerator.autocast():
            return self.prompt_cache.get(prompts, self.accelerator.device)

    @torch.no_grad()
    def generator_input(self, cond: Conditioning, step_index: int, noise: Tensor) -> Tensor:
        """z_t for student step `step_index`: pure noise, or backward simulation with the current student."""
        if step_index == 0:
            return noise
        self.meter.forward("student", noise.shape[0] * step_index, "simulation")
        return few_step_sample(self.denoiser("student"), noise, self.levels, cond,
                               generator=self.random.generator, stop_after=step_index)

    def level(self, value: float, batch: int) -> Tensor:
        return torch.full((batch,), value, dtype=torch.float64, device=self.accelerator.device)

    # --- optimisation ---------------------------------------------------------------------------------------
    def backward(self, role: str, loss: Tensor, accumulate: bool = False) -> None:
        """`role`'s gradient of `loss` into its .grad: afresh, or added to what is there (`accumulate`)."""
        if not accumulate:
            self.optimizers[role].zero_grad(set_to_none=True)
        self.roles.activate(role)  # gradient checkpointing recomputes in backward with the active adapter: this one
        self.accelerator.backward(loss)
        self.meter.backward(role)


    def optimize(self, role: str, loss: Tensor | None, accumulate: bool = False) -> float:
        """Backward, clip, step; a non-finite gradient (identical on every process) skips the update.
        `accumulate`: add to the gradient already in .grad (the regression loss's) instead of starting afresh;
        `loss` None: step on the gradient already there alone (the regression-only control)."""
        optimizer, accelerator = self.optimizers[role], self.accelerator
        if loss is not None:
            self.backward(role, loss, accumulate)
        parameters = self.roles.trainable_parameters(role)
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = float(accelerator.clip_grad_norm_(parameters, max_norm))
        if math.isfinite(grad_norm):
            optimizer.step()
        else:
            self.nonfinite_skips += 1
            logger.warning("step %d: non-finite %s gradient, update skipped", self.step, role)
        self.schedulers[role].step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


    def progress_disabled(self) -> bool:
        # TQDM_DISABLE is tqdm's own switch; an explicit `disable` would override it
        return not self.accelerator.is_local_main_process or bool(os.environ.get("TQDM_DISABLE"))

    def train_step(self) -> dict[str, float]:
        """One step of Algorithm 1 (`method.DecoupledDMD.train_step`: the student's update and the fake's), then
        the run's part: the student's EMA, the step count, the non-finite streak, and the step's cost."""
        self.meter.reset()
        skips_before = self.nonfinite_skips
        logs = self.method.train_step()
        if self.ema is not None:
            logs["ema_decay"] = self.ema.update(self.roles.trainable_state_dict("student"), self.step)
        self.step += 1
        if self.nonfinite_skips == skips_before:
            self.successful_updates, self.nonfinite_streak = self.successful_updates + 1, 0
        else:
            self.nonfinite_streak += 1
        logs["nonfinite_skips"] = float(self.nonfinite_skips)
        logs.update(self.meter.logs())
        return logs

    @property
    def regression(self):
        """DMD's regression loss of this run (`regression.RegressionLoss`: its pairs), or None."""
        return self.method.regression

    @contextlib.contextmanager
    def eager_calls(self):
        """Calls without CUDA graphs inside (one-off calls outside the planned memory pool)."""
        graphs, self.graphs = self.graphs, None
        try:
            yield
        finally:
            self.graphs = graphs

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self) -> str | None:
        """Train to max_train_steps (or until stopped); returns the path of the saved student, or None when it was
        stopped before its first update (nothing is written then).

        The run owns output_dir while it trains; a resume is checked against the state first (`check_resumable`).
        Raises `TrainingFailed` when no update succeeds, or too many in a row do not: the last good state stays.
        """
        config = self.config
        owner = own_output_dir(config.output_dir) if self.accelerator.is_main_process else contextlib.nullcontext()
        with owner:
            if self.accelerator.is_main_process:
                remove_stale_staging(config.output_dir)
            state_dir = find_state(config)
            record = check_resumable(config, state_dir)
            if record is not None:
                self.progress = resume(self.accelerator, state_dir, record, self.identity(), self.random.generator,
                                       config.output_dir)
                self.callbacks.on_phase(f"continuing the run in {config.output_dir} at step {self.step} "
                                        f"of {config.max_train_steps}")
                self.callbacks.on_resume(self.step)
            else:
                self.callbacks.on_phase(f"starting a fresh run in {config.output_dir}")
            return self._train()

    def _train(self) -> str | None:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        self._reserve_output_paths()
        if accelerator.is_main_process:
            accelerator.init_trackers("decoupled_dmd", config={k: v for k, v in config.to_dict().items()
                                                               if isinstance(v, (int, float, str, bool))})
        if self.regression is not None and self.step < config.max_train_steps:
            self.regression.prepare(self)  # before seconds_per_step's clock; stopped: the loop below ends at once
        progress = tqdm(total=config.max_train_steps, initial=self.step, desc="decoupled-dmd",
                        disable=self.progress_disabled())
        started, first_step, save_due = time.time(), self.step, False
        while self.step < config.max_train_steps:
            if self.callbacks.should_stop():
                logger.info("stop requested: saving step %d", self.step)
                break
            logs = self._reduce(self.train_step())
            logs["seconds_per_step"] = (time.time() - started) / (self.step - first_step)
            self._log(logs)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss_generator']:.4f}", std=f"{logs['gen_std']:.3f}")
            self.callbacks.on_step(self.step, logs)
            if self.nonfinite_streak >= config.max_nonfinite_updates:
                progress.close()
                raise TrainingFailed(self._divergence_message())
            save_due = save_due or bool(config.save_every_n_steps and self.step % config.save_every_n_steps == 0)
            if save_due and self.nonfinite_streak == 0 and self.step < config.max_train_steps:
                self.save()  # never during a non-finite streak: the last good state must stay the newest
                save_due = False
            if config.sample_every_n_steps and self.step % config.sample_every_n_steps == 0:
                self.sample_preview()
        progress.close()
        if self.successful_updates == 0:
            if self.step == 0 and self.callbacks.should_stop():
                logger.info("stopped before the first update: nothing was trained, nothing written")
                return None
            raise TrainingFailed(self._divergence_message())
        path = self.save(final=True)
        if not (config.sample_every_n_steps and self.step % config.sample_every_n_steps == 0):
            self.sample_preview()  # the final preview, unless the last step already wrote one
        accelerator.end_training()
        return path

    def _divergence_message(self, what: str | None = None) -> str:
        states = list_states(self.config.output_dir)
        kept = f"the last good state is {states[-1]!r}" if states else "no state was written"
        what = what or (f"{self.nonfinite_streak} updates in a row had a non-finite gradient "
                        f"({self.successful_updates} succeeded in all)")
        config = self.config
        scale = config.network_alpha / config.network_dim if config.training_mode == "lora" else 1.0
        alpha = (f"network_alpha {config.network_alpha:g} over network_dim {config.network_dim} (every LoRA update "
                 f"scaled {scale:g}x), " if scale > 2 else "")
        return (f"training stopped at step {self.step}: {what}, so no student was written for them. Likely "
                f"causes: {alpha}a learning rate or loss weight too high, guidance_scale too high, fp16 overflow (use "
                f"bf16), or a damaged teacher; {kept}. Lower the learning rate or fix the cause, then resume or "
                "start over")

    def _reduce(self, logs: dict[str, float]) -> dict[str, float]:
        """Average every logged number over processes, in one collective."""
        if self.accelerator.num_processes == 1:
            return logs
        names = sorted(logs)
        values = torch.tensor([logs[k] for k in names], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def _log(self, logs: dict[str, float]):
        self.accelerator.log(logs, step=self.step)
        if self.accelerator.is_main_process:
            self.metrics_log.append({"step": self.step, **logs})

    # --- previews, saving, resuming --------------------------------------------------------------------------
    def student_in_use(self):
        """Context in which the student's weights are the ones users get: the EMA with `student_ema_decay`, else
        the trained weights themselves (previews, evaluation and the saved file all run inside it)."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.applied(self.roles.trainable_state_dict("student"))

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int) -> Tensor:
        """Student few-step samples for `prompts` as images in [0, 1] (fixed seed, independent of training)."""
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.latent_shape), generator=generator).to(self.accelerator.device)
        cond = self.conditioning(prompts)
        with self.accelerator.autocast(), self.student_in_use():
            latents = few_step_sample(self.denoiser("student"), noise, self.levels, cond, generator=generator)
        return self.adapter.decode(latents)

    def sample_preview(self) -> str | None:
        images = self.sample(self.sample_prompts, self.config.seed)
        self.callbacks.on_preview(self.step, images)
        if not self.accelerator.is_main_process:
            return None
        path = os.path.join(self.config.output_dir, "samples", f"step_{self.step:06d}.png")
        save_image_grid(images, path)
        return path

    def _reserve_output_paths(self) -> None:
        """Pick this run's file names once: an existing file from another run gets a counter, not overwritten
        (unless `overwrite`); a resumed run keeps the names it started with."""
        if self.output_paths is not None:
            return
        config = self.config
        wanted = {"student": os.path.join(config.output_dir, f"{config.output_name}.safetensors"),
                  "checkpoint": os.path.join(config.output_dir, f"{config.output_name}_checkpoint.safetensors")}
        self.output_paths = {role: path if config.overwrite else free_path(path) for role, path in wanted.items()}
        for role, path in self.output_paths.items():
            if path != wanted[role]:
                logger.info("%s exists; this run writes %s (set overwrite = true to replace)", wanted[role], path)

    def student_file(self) -> str:
        self._reserve_output_paths()
        return self.output_paths["student"]

    def save(self, final: bool = False) -> str:
        """Write the student weights and a resumable state for the current step; returns the student path.

        The final save also writes the all-in-one checkpoint when `save_merged_checkpoint` is set."""
        accelerator = self.accelerator
        if not all(bool(torch.isfinite(p).all()) for p in self.roles.trainable_parameters("student")):
            raise TrainingFailed(self._divergence_message(f"at step {self.step} the student's weights hold NaN or inf"))
        path = self.student_file()
        state_dir = save_state(accelerator, self.config, self.progress, self.random.generator, self.identity())
        if accelerator.is_main_process:
            config, dtype = self.config, SAVE_DTYPES[self.config.save_precision]
            with self.student_in_use():  # the state keeps the trained weights; the files, the ones users get
                file_format, tensors = student_tensors(self.roles, self.adapter.unet_ldm_keys,
                                                       self.adapter.kohya_lora_names(), config.network_alpha, dtype)
                # this run's own file: overwritten at each save
                atomic_save_safetensors(tensors, path, self._metadata(file_format), overwrite=True)
                logger.info("step %d: student saved to %s, state to %s", self.step, path, state_dir)
                if final and config.save_merged_checkpoint:
                    merged = save_merged_checkpoint(self.adapter, self.roles, self.output_paths["checkpoint"],
                                                    self._metadata("checkpoint"), dtype)
                    logger.info("merged checkpoint written to %s", merged)
        accelerator.wait_for_everyone()
        return path

    def _metadata(self, file_format: str) -> dict[str, str]:
        config, adapter = self.config, self.adapter
        return student_metadata(config, self.step, guidance_scale=self.guidance_scale, family=adapter.family,
                                prediction_type=adapter.prediction_type,
                                resolution=config.resolution_hw() or adapter.default_resolution,
                                lora_target_modules=config.lora_target_modules or adapter.default_lora_target_modules(),
                                file_format=file_format, base=self.identity().base)


class _RoleDenoiser:
    def __init__(self, trainer: DecoupledDMDTrainer, role: str):
        self.trainer, self.role, self.schedule = trainer, role, trainer.adapter.schedule

    def __call__(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        return self.trainer._call(self.role, x_t, level, cond)


def _tracker(log_with: str):
    if log_with == "none":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if log_with == "tensorboard":
            raise ValueError("log_with: tensorboard is not installed; `pip install tensorboard` or use "
                             "'none'") from None
        return None
    return "tensorboard"
