"""A memory plan before training: the peak a run will need, estimated without loading a single weight.

The static part is arithmetic on parameter counts: frozen base weights at the chosen precision, the two LoRA
adapters and their gradients (fp32), the optimiser states (AdamW: two fp32 moments; Adafactor: factored),
text encoders while prompts are encoded, the VAE for previews. The dynamic part is simulated: one training
forward/backward of the backbone (LoRA on the frozen base, gradient checkpointing as configured) and one
no-grad teacher call on its batched rows run on the meta device, where tensors have shapes and no storage; a
dispatch mode adds up the bytes of every tensor alive at each moment, so the peak includes activations saved
for backward, transients and the adapters' gradients. Mixed precision is emulated (matmul-class ops in the
autocast dtype, normalisations in fp32, as torch.autocast does), and attention is charged as the fused
kernels allocate it (output and log-sum-exp, no L x L matrix).

Nothing here knows a model family: the caller passes the backbone (real or built on the meta device), the
adapter's `predict_x0`, and conditioning of the right shapes.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .config import ConfigError
from .errors import public_name
from .graphs import uses_cuda_graphs

GIB = 1024 ** 3


@public_name
class MemoryPlanError(ConfigError):
    """The run would not fit its memory limit; the message names the settings that would make it fit."""

BYTES = {"no": 4, "fp16": 2, "bf16": 2}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# torch.autocast's lists, for the ops a UNet calls: matmul-class ops run in the low dtype, these in fp32.
_LOW_PRECISION = ("linear", "conv1d", "conv2d", "conv3d")
_FULL_PRECISION = ("group_norm", "layer_norm", "softmax", "log_softmax")


class _LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every storage created under it while its tensors live; keeps the peak."""

    def __init__(self):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for value in tree_leaves((args, kwargs)):
            # storages made before the simulation (weights, inputs) are not its own: views of them cost nothing
            if isinstance(value, Tensor) and value.untyped_storage() not in self._seen:
                self._seen[value.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, Tensor):
                self._track(value)
        return out

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        import weakref

        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.current -= size


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on meta tensors with what fused kernels (flash /
    memory-efficient, on GPUs and CPUs) allocate: the output and a per-row log-sum-exp, no L x L matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def _meta_kernels(dtype: torch.dtype | None):
    """torch.autocast's dtype rules and fused attention for meta tensors (autocast itself ignores them).

    The functional ops a backbone calls are wrapped for the duration (module attributes, so that gradient
    checkpointing's recomputation in the backward thread sees them too); a call on any other device goes to
    the original function unchanged."""
    originals = {name: getattr(F, name)
                 for name in _LOW_PRECISION + _FULL_PRECISION + ("scaled_dot_product_attention",)}

    def wrap(name: str, target: torch.dtype | None):
        original = originals[name]

        def call(*args, **kwargs):
            tensors = [v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor)]
            if not tensors or tensors[0].device.type != "meta":
                return original(*args, **kwargs)
            if name == "scaled_dot_product_attention":
                query, key, value = args[:3]
                if dtype is not None:
                    query, key, value = (t.to(dtype) for t in (query, key, value))
                return _FusedAttention.apply(query, key, value)
            if target is not None:
                cast = lambda v: v.to(target) if isinstance(v, Tensor) and v.is_floating_point() else v  # noqa: E731
                args, kwargs = tree_map(cast, (args, kwargs))
            return original(*args, **kwargs)

        return call

    try:
        for name in originals:
            target = (dtype if name in _LOW_PRECISION else torch.float32) if dtype is not None else None
            setattr(F, name, wrap(name, target))
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


@contextlib.contextmanager
def _on_meta(network: nn.Module):
    """Run `network` with every parameter and buffer swapped for a meta tensor of the same shape, dtype and
    requires_grad (its real weights, if any, are neither touched nor copied)."""
    from torch.nn.utils.stateless import _reparametrize_module

    swapped = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
               for name, t in [*network.named_parameters(), *network.named_buffers()]}
    with _reparametrize_module(network, swapped):
        yield swapped


def simulate_peak_bytes(run: Callable[[], None], mixed_precision: str = "no") -> int:
    """Peak bytes of the tensors `run` allocates on the meta device (parameters made before it excluded)."""
    tracker = _LiveBytes()
    with _meta_kernels(AUTOCAST_DTYPES.get(mixed_precision)), tracker:
        run()
    return tracker.peak


def simulate_training_step(network: nn.Module, predict_x0: Callable, cond_for: Callable[[int], object],
                           latent_shape: tuple[int, ...], batch: int, no_grad_rows: int,
                           mixed_precision: str = "no", owner: nn.Module | None = None) -> dict[str, int]:
    """Peak bytes above the weights of (a) one trained forward/backward of `network` as it stands (LoRA and
    gradient checkpointing as set on it) and (b) one no-grad call on `no_grad_rows` x batch rows."""
    level_value = 0.5

    def forward(rows: int):
        x = torch.zeros((rows, *latent_shape), device="meta")
        level = torch.full((rows,), level_value, dtype=torch.float64, device="meta")
        return predict_x0(network, x, level, cond_for(rows))

    def train():
        forward(batch).float().square().mean().backward()

    def teacher():
        with torch.no_grad():
            forward(batch * no_grad_rows)

    was_training = network.training
    with _on_meta(owner if owner is not None else network):
        network.train()  # gradient checkpointing acts in training mode only
        try:
            out = {"train_step": simulate_peak_bytes(train, mixed_precision),
                   "no_grad_call": simulate_peak_bytes(teacher, mixed_precision)}
        finally:
            network.train(was_training)
    return out


def optimizer_state_bytes(parameters: list[Tensor], optimizer_type: str) -> int:
    """fp32 optimiser state: AdamW keeps two moments; Adafactor (no first moment) factors the second over each
    tensor's last two dims (rows + columns) and keeps 1-D tensors whole."""
    total = 0
    for p in parameters:
        if optimizer_type == "adamw":
            total += 2 * p.numel()
        elif p.dim() >= 2:
            total += math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1])
        else:
            total += p.numel()
    return 4 * total


def format_bytes(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024 ** 2:.0f} MiB"


@dataclass
class MemoryPlan:
    """Bytes by part and the peak they imply on the training device."""

    parts: dict[str, int]
    phases: dict[str, int]
    device: str = "cuda"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def table(self) -> str:
        lines = [f"memory plan ({self.device}):"]
        lines += [f"  {name:<40} {format_bytes(value):>10}" for name, value in self.parts.items()]
        lines += [f"  {'peak while ' + name:<40} {format_bytes(value):>10}" for name, value in self.phases.items()]
        lines.append(f"  => peak {format_bytes(self.peak)} ({self.peak_phase})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"parts": dict(self.parts), "phases": dict(self.phases), "peak": self.peak,
                "peak_phase": self.peak_phase, "device": self.device}


def build_plan(*, base_bytes: int, adapter_parameters: dict[str, list[Tensor]], optimizer_type: str,
               simulated: dict[str, int], text_encoder_bytes: int = 0, encode_bytes: int = 0, vae_bytes: int = 0,
               device: str = "cuda", held_parameters: list[Tensor] | None = None, adapter_scale: float = 1.0,
               optimizer_step: bool = False, graph_pool: bool = False) -> MemoryPlan:
    """Combine the static parts with the simulated peaks into phases:
    - encoding prompts: base, text encoders and their activations (encoders leave a GPU afterwards);
    - training: base, trained weights, optimiser states, VAE, plus the larger of a trained step (activations and
      one role's gradients, simulated) and the widest no-grad call;
    - with `optimizer_step`: AdamW's step, one role's gradients and one temporary of its size;
    - with `graph_pool` (CUDA graphs of the no-grad calls, trainer/graphs.py): the widest no-grad call's
      temporaries stay reserved in the graphs' pool for the whole run, beside a trained step.

    `adapter_parameters` are the optimised roles' tensors; `held_parameters` every trained tensor in memory
    (default: the same; LoRA mode holds both adapters whether or not the fake trains); `adapter_scale` scales
    all of them (another LoRA rank, planned without rebuilding the adapters)."""
    optimized = [p for params in adapter_parameters.values() for p in params]
    held = optimized if held_parameters is None else held_parameters
    trained = int(adapter_scale * 4 * sum(p.numel() for p in held))
    optimizer = int(adapter_scale * optimizer_state_bytes(optimized, optimizer_type))
    parts = {"base weights": base_bytes, "trained weights (fp32, student + fake)": trained,
             "optimizer states": optimizer, "VAE": vae_bytes, "text encoders (while encoding)": text_encoder_bytes,
             "trained step (activations + grads)": simulated["train_step"],
             "widest no-grad call": simulated["no_grad_call"]}
    resident = base_bytes + trained + optimizer + vae_bytes
    if graph_pool:
        parts["CUDA graph pool (no-grad calls)"] = simulated["no_grad_call"]
        resident += simulated["no_grad_call"]
    if device == "cpu":  # "offloading" the text encoders to the CPU keeps them where they are
        resident += text_encoder_bytes
    phases = {"encoding prompts": base_bytes + trained + text_encoder_bytes + encode_bytes + vae_bytes,
              "training": resident + max(simulated["train_step"], simulated["no_grad_call"])}
    if optimizer_step:
        one_role = max(sum(p.numel() for p in params) for params in adapter_parameters.values())
        phases["optimizer step"] = resident + 2 * int(adapter_scale * 4 * one_role)
    return MemoryPlan(parts, phases, device)


# --- the plan of a configured run ------------------------------------------------------------------------------
ALLOCATOR_HEADROOM = 1.15  # the caching allocator reserves above the bytes in use (H200, SDXL 1024: 1.15x the plan)


def widest_no_grad_rows(config) -> int:
    """Rows per sample of the widest no-grad call: the student update's batched teacher call (the plan of
    `method.TeacherRows`, which the update itself reads), or the batched student samples of the fake updates."""
    from .method import TeacherRows

    rows = TeacherRows.from_config(config).count
    if config.batch_fake_samples and config.uses_fake_model:
        rows = max(rows, config.fake_updates_per_step - (1 if config.share_generator_sample else 0))
    return max(rows, 1)


def plan_training_memory(adapter, roles, config, latent_shape: tuple[int, ...], cond_for: Callable[[int], object],
                         device: str = "cuda", text_encoder_parameters: int = 0, vae_parameters: int = 0,
                         adapter_scale: float = 1.0, simulate_on: tuple | None = None) -> MemoryPlan:
    """The memory plan of `config` on `adapter`'s backbone with `roles` (LoRA adapters or full copies) on it.

    The backbone may hold real weights or live on the meta device; it is never modified (gradient
    checkpointing must already be set as the config says). `adapter_scale`: see `build_plan`. `simulate_on` =
    (adapter, roles, cond_for) runs the simulated calls on a stand-in of the same architecture
    (`planning_skeleton`) while the parameter arithmetic stays on the real model."""
    weight_bytes = BYTES[config.mixed_precision]
    roles_used = ["student"] + (["fake"] if config.uses_fake_model else [])
    trainable = {role: roles.trainable_parameters(role) for role in ("student", "fake")}
    trained_ids = {id(p) for params in trainable.values() for p in params}
    frozen = roles.activate("teacher")  # LoRA mode: the shared base; full mode: the teacher's own copy
    base = sum(p.numel() for p in frozen.parameters() if id(p) not in trained_ids) * weight_bytes
    network = roles.activate("student")
    sim_adapter, sim_network = adapter, network
    if simulate_on is not None:
        sim_adapter, sim_roles, cond_for = simulate_on
        sim_network = sim_roles.activate("student")
    simulated = simulate_training_step(sim_network, sim_adapter.predict_x0, cond_for, latent_shape,
                                       config.train_batch_size, widest_no_grad_rows(config), config.mixed_precision,
                                       owner=sim_adapter.planning_module(sim_network))
    return build_plan(base_bytes=base, adapter_parameters={r: trainable[r] for r in roles_used},
                      optimizer_type=config.optimizer_type, simulated=simulated,
                      text_encoder_bytes=text_encoder_parameters * weight_bytes, vae_bytes=4 * vae_parameters,
                      device=device, held_parameters=[p for params in trainable.values() for p in params]
                      + (trainable["student"] if config.student_ema_decay else []),  # the EMA's fp32 copy
                      adapter_scale=adapter_scale, optimizer_step=True,
                      graph_pool=uses_cuda_graphs(config, adapter, device))


def skeleton_roles(skeleton, config):
    """The trained roles `config` asks for (LoRA adapters or full copies), with its gradient checkpointing, on a
    stand-in backbone built on the meta device for planning."""
    from .networks import FullRoles, LoraRoles

    network = skeleton.network
    if config.training_mode == "lora":
        targets = config.lora_target_modules or skeleton.default_lora_target_modules()
        roles = LoraRoles(network, config.network_dim, config.network_alpha, targets)
    else:
        roles = FullRoles(network)
    if config.gradient_checkpointing:
        skeleton.enable_gradient_checkpointing(network)
    return roles


def knob_savings(plan_for: Callable[[object], MemoryPlan], config, base_plan: MemoryPlan) -> list[tuple[str, int]]:
    """[(what to set, bytes it saves)] for the settings that shrink the peak, best first; each is planned
    with that one change."""
    candidates = []
    if config.network_dim > 8:
        candidates.append((f"network_dim = {config.network_dim // 2}", {"network_dim": config.network_dim // 2}))
    if config.optimizer_type == "adamw":
        candidates.append(('optimizer_type = "adafactor"', {"optimizer_type": "adafactor"}))
    if not config.gradient_checkpointing:
        candidates.append(("gradient_checkpointing = true", {"gradient_checkpointing": True}))
    if config.mixed_precision == "no":
        candidates.append(('mixed_precision = "bf16"', {"mixed_precision": "bf16"}))
    if config.cuda_graphs and "CUDA graph pool (no-grad calls)" in base_plan.parts:
        candidates.append(("cuda_graphs = false", {"cuda_graphs": False}))
    if config.train_batch_size > 1:
        candidates.append(("train_batch_size = 1", {"train_batch_size": 1}))
    hw = config.resolution_hw()
    if hw:
        smaller = tuple(max(64, int(v * 0.75) // 64 * 64) for v in hw)
        if smaller != hw:
            candidates.append((f'resolution = "{smaller[1]},{smaller[0]}"',
                               {"resolution": f"{smaller[1]},{smaller[0]}"}))
    out = []
    for label, change in candidates:
        try:
            saved = base_plan.peak - plan_for(config.replace(**change)).peak
        except Exception:  # a knob this model cannot plan (e.g. no checkpointing) is simply not offered
            continue
        if saved > 0:
            out.append((label, saved))
    return sorted(out, key=lambda item: -item[1])


def memory_limit_bytes(config, device: str, host_available: int | None = None) -> int | None:
    """memory_limit_gb, or what the host application reports (`host_available`: ComfyUI's free memory plus the
    weights the plan counts, ModelAdapter.memory_available_bytes), or what this process can use: on a GPU its free
    memory plus what this process already holds; on a CPU the RAM available plus this process's resident memory;
    None where neither can be read."""
    if config.memory_limit_gb:
        return int(config.memory_limit_gb * GIB)
    if host_available is not None:
        return int(host_available)
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())
    if device == "cpu":
        return available_ram_bytes()
    return None


def available_ram_bytes() -> int | None:
    """RAM this process could use: what the OS reports available (not merely free: caches it would drop count)
    plus what this process already holds. psutil where installed, else Linux's /proc; None elsewhere."""
    try:
        import psutil

        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return available + resident
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_fits(plan: MemoryPlan, limit_bytes: int | None, knobs: Callable[[], list[tuple[str, int]]]) -> None:
    """Raise MemoryPlanError naming the knobs (and what each saves) when the plan's peak, with the allocator's
    headroom, exceeds `limit_bytes`."""
    if not limit_bytes:
        return
    needed = int(plan.peak * ALLOCATOR_HEADROOM)
    if needed <= limit_bytes:
        return
    lines = [f"memory plan: this run needs about {needed / GIB:.1f} GiB ({plan.peak / GIB:.1f} GiB at its peak "
             f"while {plan.peak_phase}, plus {ALLOCATOR_HEADROOM - 1:.0%} allocator headroom) but "
             f"{limit_bytes / GIB:.1f} GiB are available; nothing was trained. Settings that help, each alone:"]
    lines += [f"  {label}: -{saved / GIB:.1f} GiB" for label, saved in knobs()]
    lines.append("  (memory_limit_gb sets the limit; by default it is the GPU's free memory, or on a CPU the RAM "
                 "available)")
    raise MemoryPlanError("\n".join(lines))
