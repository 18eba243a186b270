"""The one denoiser contract every trainer and sampler uses: D(x_t, level, cond) -> x0.

A `ModelAdapter` knows one kind of model (diffusers UNet, ComfyUI ModelPatcher, ...): how to encode prompts,
call a network and resolve its output to x0, its `NoiseSchedule`, and how to decode latents for previews.
Above this file nothing knows whether a model predicts eps, v or a flow velocity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule, Prediction, get_prediction

FAMILY_GUIDANCE_DEFAULTS = {"sdxl": 8.0, "sd15": 1.75}  # DMD2's choices; other families use 5.0


@dataclass(frozen=True)
class Conditioning:
    """Named per-sample conditioning tensors (batch first), e.g. encoder_hidden_states and pooled embeds."""

    tensors: dict[str, Tensor]

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                             for k, v in self.tensors.items()})

    def select(self, indices: Tensor | list[int]) -> "Conditioning":
        index = torch.as_tensor(indices, dtype=torch.long)
        return Conditioning({k: v[index.to(v.device)] for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        names = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in names})


class Denoiser(Protocol):
    """D(x_t, level, cond) -> x0, with level the paper's t per sample (0 noise, 1 clean)."""

    schedule: NoiseSchedule

    def __call__(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor: ...


def batched_x0(denoise: Callable[[Tensor, Tensor, Conditioning], Tensor],
               rows: list[tuple[Tensor, Tensor, Conditioning]]) -> list[Tensor]:
    """x0 of several (x_t, level, cond) rows in one call, split back per row: CFG's cond and uncond halves
    (plus DM's row in the generator update) cost one batched call instead of one each."""
    if len(rows) == 1:
        return [denoise(*rows[0])]
    x0 = denoise(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]),
                 Conditioning.cat([r[2] for r in rows]))
    return list(x0.split([r[0].shape[0] for r in rows]))


class ModelAdapter(ABC):
    """Everything model-specific the trainer needs, behind one small surface."""

    family: str
    prediction_type: str
    schedule: NoiseSchedule
    network: nn.Module  # the denoising backbone (UNet): teacher weights, adapters are added on it
    latent_channels: int
    latent_downscale: int  # pixels per latent cell (8 for SD VAEs, 1 for pixel-space models)
    default_resolution: tuple[int, int]  # (height, width) in pixels
    source_checkpoint: str | None = None  # the single-file checkpoint the teacher came from (merged outputs)
    source_model: str | None = None  # what the user named: file, folder or hub id
    unet_ldm_keys: dict[str, str] | None = None  # backbone weight name -> LDM name (kohya LoRA keys), if any
    supports_cuda_graphs: bool = False  # its no-grad calls can be captured as CUDA graphs (trainer/graphs.py)

    @abstractmethod
    def predict_x0(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """Call `network` (this backbone, possibly wrapped for DDP) and resolve its output to x0 (float32)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the model's own tokenizers and text encoders (no grad)."""

    @abstractmethod
    def default_lora_target_modules(self) -> list[str]:
        """Module names LoRA wraps by default for this backbone."""

    def kohya_lora_names(self) -> dict[str, str] | None:
        """{backbone module: the path kohya's own trainer gives it in a LoRA file} for this family
        (`formats.kohya_module_names`); None where the backbone has no LDM layout (the file keeps peft names).
        Here the backbone's modules carry diffusers names, which `unet_ldm_keys` maps to LDM ones."""
        from .formats import kohya_module_names, lora_module_names

        if self.unet_ldm_keys is None:
            return None
        ldm = lora_module_names(self.unet_ldm_keys)
        return kohya_module_names(self.family, ldm, {module: module for module in ldm})

    def lora_aliases(self) -> dict[str, str]:
        """{name a LoRA file may use for a backbone module: that module's own name} (kohya, ComfyUI, diffusers)."""
        from .formats import lora_aliases, lora_module_names

        aliases: dict[str, str] = {}
        for module, ldm in lora_module_names(self.unet_ldm_keys or {}).items():
            aliases.update(lora_aliases(module, None, ldm))
        return aliases

    @property
    def prediction(self) -> Prediction:
        """The network's output as an object (`schedules.Prediction`): how x0 is read from it, how its loss weighs."""
        return get_prediction(self.prediction_type)

    def denoising_loss_weight(self, level: Tensor) -> Tensor:
        """Per-sample w(t) of this model's own objective against an x0 loss (`Prediction.loss_weight`)."""
        return self.schedule.denoising_loss_weight(level, self.prediction)

    def fake_loss_weight(self, level: Tensor, target: str) -> Tensor | None:
        """Per-sample weight that turns the fake model's x0 error into its training objective: the model's own
        (eps / v / flow, DMD2's choice) for target 'native', none (plain x0, Algorithm 1) for 'x0'."""
        if target == "x0":
            return None
        return self.denoising_loss_weight(level).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images in [0, 1], (B, 3, H, W); pixel-space models map [-1, 1] to [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def enable_gradient_checkpointing(self, network: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def identity(self) -> dict[str, str]:
        """What the student's metadata records as its base: a name (never a local path) and, where a file holds
        the weights, its sha256."""
        return {"model": self.source_model or ""}

    def merged_checkpoint_problem(self) -> str | None:
        """Why `save_merged_checkpoint` cannot work with this teacher (a message saying what to do), or None."""
        return f"{type(self).__name__} cannot write an all-in-one checkpoint; set save_merged_checkpoint = false"

    def planning_module(self, network: nn.Module) -> nn.Module:
        """The module whose parameters and buffers the memory plan swaps for meta tensors to simulate a call of
        `network`: the backbone itself, or whatever owns it and the tables its calls read."""
        return network

    def planning_skeleton(self) -> "ModelAdapter | None":
        """An adapter of the same architecture that the memory plan can run on the meta device, where this one's
        calls cannot (a host application's internals); None: simulate this adapter itself."""
        return None

    def memory_available_bytes(self, device: str) -> int | None:
        """Memory this run may use as a host application reports it, counting what this adapter's backbone
        already holds (the plan counts those weights); None: no host, the trainer reads the device itself."""
        return None

    def text_encoder_parameters(self) -> int:
        """Parameters of the text encoders this adapter moves to the training device (0: managed elsewhere)."""
        return 0

    def vae_parameters(self) -> int:
        """Parameters of the VAE kept on the training device for previews (0: managed elsewhere)."""
        return 0

    def disable_gradient_checkpointing(self, network: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot turn gradient checkpointing off")

    # place and offload_text_encoders are optional hooks: default no-ops that adapters may override
    def place(self, device, weight_dtype) -> None:  # noqa: B027
        """Put the backbone (in `weight_dtype`) and the encoders on the training device (a no-op where the
        host application manages devices)."""

    def offload_text_encoders(self) -> None:  # noqa: B027
        """Free the text encoders' memory once every prompt is cached (a no-op where they are shared)."""

    @property
    def default_guidance_scale(self) -> float:
        return FAMILY_GUIDANCE_DEFAULTS.get(self.family, 5.0)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.latent_downscale or width % self.latent_downscale:
            raise ValueError(f"resolution {width}x{height} must be a multiple of {self.latent_downscale}")
        return self.latent_channels, height // self.latent_downscale, width // self.latent_downscale

    def denoiser(self, network: nn.Module | None = None, activate: Callable[[], None] | None = None) -> Denoiser:
        """A `Denoiser` over `network` (default: this backbone); `activate` selects adapters before each call."""
        return _BoundDenoiser(self, network if network is not None else self.network, activate)


class _BoundDenoiser:
    def __init__(self, adapter: ModelAdapter, network: nn.Module, activate):
        self.adapter, self.network, self.activate = adapter, network, activate
        self.schedule = adapter.schedule

    def __call__(self, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        if self.activate is not None:
            self.activate()
        return self.adapter.predict_x0(self.network, x_t, level, cond)


class PromptCache:
    """Encodes each distinct prompt once and keeps it on the CPU; hands out batches on the compute device."""

    def __init__(self, adapter: ModelAdapter, batch_size: int = 16):
        self.adapter, self.batch_size = adapter, batch_size
        self._cache: dict[str, Conditioning] = {}

    def add(self, prompts: list[str]) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            encoded = self.adapter.encode_prompts(chunk).to("cpu")
            for i, prompt in enumerate(chunk):
                self._cache[prompt] = encoded.select([i])

    def get(self, prompts: list[str], device=None) -> Conditioning:
        self.add(prompts)
        return Conditioning.cat([self._cache[p] for p in prompts]).to(device)

    def __len__(self) -> int:
        return len(self._cache)
