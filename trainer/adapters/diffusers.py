"""Diffusers adapter: UNet2DConditionModel teachers (SD1.5 eps/v, SDXL, flow-matching UNets)."""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..denoiser import Conditioning, ModelAdapter
from ..ldm_layout import unet_key_map
from ..schedules import DiscreteVPSchedule, FlowSchedule, NoiseSchedule, append_dims, prediction_to_x0

logger = logging.getLogger(__name__)


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every `.to(dtype)` of a model that lists modules to keep in float32, even when the list
    is empty ("... should be kept in float32: []"): twice a run, meaning nothing to a creator. Others pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())

# The LCM-LoRA / DMD2 SDXL LoRA targets: attention, feed-forward, resnet convs, samplers, time embedding.
UNET_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


def schedule_from_scheduler_config(config: dict) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction_type) from a diffusers scheduler config, using diffusers' own beta tables."""
    class_name = config.get("_class_name", "")
    if "FlowMatch" in class_name:
        if config.get("shift", 1.0) != 1.0 or config.get("use_dynamic_shifting", False):
            logger.info("flow scheduler shift is a sampling choice; training levels stay unshifted")
        return FlowSchedule(config.get("num_train_timesteps", 1000)), "flow"
    from diffusers import DDPMScheduler

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction")
    ddpm = DDPMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return DiscreteVPSchedule(ddpm.alphas_cumprod), prediction_type


class DiffusersAdapter(ModelAdapter):
    """A diffusers UNet teacher with its CLIP text encoder(s), tokenizer(s) and optional VAE."""

    supports_cuda_graphs = True  # a call is pure tensor work on the device (captured and replayed on an H200)

    def __init__(self, unet, text_encoders: list, tokenizers: list, schedule: NoiseSchedule, prediction_type: str,
                 vae=None, uncond_mode: str = "empty_prompt"):
        self.network = unet
        self.text_encoders = list(text_encoders or [])
        self.tokenizers = list(tokenizers or [])
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.vae = vae
        self.uncond_mode = uncond_mode
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        self.token_length = tokenizers[0].model_max_length if tokenizers else 77
        if self.is_sdxl and text_encoders and len(self.text_encoders) != 2:
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs two text encoders")
        if prediction_type == "flow":
            self.family = "flow"
        else:
            self.family = "sdxl" if self.is_sdxl else "sd15"
        self.latent_channels = unet.config.in_channels
        self.latent_downscale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.default_resolution = (size * self.latent_downscale, size * self.latent_downscale)
        self.source_checkpoint: str | None = None  # the single-file checkpoint it was read from, if any
        self.source_model: str | None = None  # the folder / hub id / file the user named
        try:  # the LDM names of the UNet's weights: LoRA keys and merged checkpoints use them
            self.unet_ldm_keys: dict[str, str] | None = unet_key_map(dict(unet.config), unet.state_dict().keys())
        except (KeyError, ValueError) as error:
            logger.info("no LDM layout for this UNet (%s); its LoRA is saved in diffusers/peft names", error)
            self.unet_ldm_keys = None

    # --- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, uncond_mode: str = "empty_prompt", dtype=torch.float32,
                        load_vae: bool = True) -> "DiffusersAdapter":
        """Load a diffusers pipeline folder (or hub id) without the pipeline class: unet, text encoders, VAE."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        local = os.path.isdir(path)
        if local:
            missing = [s for s in ("unet", "text_encoder", "tokenizer", "scheduler")
                       if not os.path.isdir(os.path.join(path, s))]
            if missing:
                raise ConfigError(
                    f"{path!r} is not a diffusers model folder: missing {', '.join(m + '/' for m in missing)} "
                    "(single-file .safetensors checkpoints need the checkpoint loader)")
        common = {"local_files_only": local}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **common)
        scheduler_config = read_scheduler_config(path, local)
        schedule, prediction_type = schedule_from_scheduler_config(scheduler_config)
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **common)]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)]
        if unet.config.addition_embed_type == "text_time":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", torch_dtype=dtype, **common))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common))
        vae = None
        if load_vae and (not local or os.path.isdir(os.path.join(path, "vae"))):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **common)
        for module in [unet, vae, *encoders]:
            if module is not None:
                module.requires_grad_(False).eval()
        adapter = cls(unet, encoders, tokenizers, schedule, prediction_type, vae=vae, uncond_mode=uncond_mode)
        adapter.source_model = path
        return adapter

    @classmethod
    def skeleton(cls, path: str, v_parameterization: bool | None = None) -> tuple["DiffusersAdapter", dict[str, int]]:
        """The teacher's structure without its weights, for the memory plan: the UNet built on the meta device
        (no memory, no file read beyond configs and headers) and the parameter counts of the text encoders
        and VAE. Single-file checkpoints are read from their header; diffusers folders from their configs."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if os.path.isfile(path):
            from ..formats import inspect_checkpoint
            from ..ldm_layout import SD15_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, VAE_PREFIX

            info = inspect_checkpoint(path, v_parameterization)
            unet_config, schedule = dict(info.unet_config), DiscreteVPSchedule.scaled_linear()
            prediction_type = info.prediction_type
            count = lambda *prefixes: sum(math.prod(s) for k, s in info.shapes.items() if k.startswith(prefixes))  # noqa: E731
            sizes = {"text_encoders": count(SD15_CLIP_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX),
                     "vae": count(VAE_PREFIX)}
            downscale = 8  # the SD1.5 / SDXL VAE
            if unet_config.get("addition_embed_type") == "text_time":
                projection = [s for k, s in info.shapes.items()
                              if k.startswith(SDXL_CLIP_G_PREFIX) and k.endswith("text_projection")]
                pooled = projection[0][-1] if projection else 1280
                unet_config["addition_time_embed_dim"] = (
                    (unet_config["projection_class_embeddings_input_dim"] - pooled) // 6)
        else:
            unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=True)
            schedule, prediction_type = schedule_from_scheduler_config(read_scheduler_config(path, True))
            sizes, downscale = {"text_encoders": 0, "vae": 0}, 8
            for folder in ("text_encoder", "text_encoder_2"):
                if os.path.isdir(os.path.join(path, folder)):
                    sizes["text_encoders"] += _meta_parameter_count(path, folder)
            if os.path.isdir(os.path.join(path, "vae")):
                with torch.device("meta"):
                    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae"))
                sizes["vae"] = sum(p.numel() for p in vae.parameters())
                downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
        adapter = cls(unet, [], [], schedule, prediction_type)
        tokenizer_config = os.path.join(path, "tokenizer", "tokenizer_config.json")
        if os.path.isfile(tokenizer_config):
            import json

            with open(tokenizer_config, encoding="utf-8") as handle:
                adapter.token_length = int(json.load(handle).get("model_max_length", 77))
        if sizes["vae"]:
            adapter.latent_downscale = downscale
            size = unet.config.sample_size
            size = size if isinstance(size, int) else size[0]
            adapter.default_resolution = (size * downscale, size * downscale)
        return adapter, sizes

    def example_conditioning(self, rows: int, device="meta") -> Conditioning:
        """Conditioning of the right shapes and no content (the memory plan's simulated calls)."""
        config = self.network.config
        tensors = {"encoder_hidden_states": torch.zeros((rows, self.token_length, config.cross_attention_dim),
                                                        device=device)}
        if self.is_sdxl:
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            tensors["text_embeds"] = torch.zeros((rows, pooled), device=device)
        return Conditioning(tensors)

    def identity(self) -> dict[str, str]:
        from ..formats import file_sha256

        source = self.source_checkpoint or self.source_model or ""
        out = {"model": os.path.basename(source.rstrip("/")) if os.path.exists(source) else source}
        weights = self.source_checkpoint or _diffusers_unet_file(source)
        if weights:
            out["sha256"] = file_sha256(weights)
        return out

    def merged_checkpoint_problem(self) -> str | None:
        if self.source_checkpoint or self.family in ("sd15", "sdxl"):
            return None  # the input file with the UNet replaced, or an LDM export of the diffusers parts
        return (f"save_merged_checkpoint: needs an SD1.5/SDXL teacher (a single-file checkpoint or a diffusers "
                f"folder), not a {self.family!r} model; set it to false")

    def text_encoder_parameters(self) -> int:
        return sum(p.numel() for encoder in self.text_encoders for p in encoder.parameters())

    def vae_parameters(self) -> int:
        return 0 if self.vae is None else sum(p.numel() for p in self.vae.parameters())

    # --- the denoiser ------------------------------------------------------------------------------------
    def predict_x0(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        level = torch.as_tensor(level, dtype=torch.float64, device=x_t.device)
        alpha, sigma = self.schedule.alpha_sigma(level)
        timestep = self.schedule.timestep(level).to(torch.float32)
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if self.is_sdxl:
            height, width = (s * self.latent_downscale for s in x_t.shape[-2:])
            # (original size, crop top-left, target size) = (H, W, 0, 0, H, W): uncropped square-on training
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                           "time_ids": self._time_ids(height, width, x_t.device)
                                           .expand(x_t.shape[0], 6)}
        prediction = network(x_t, timestep, return_dict=False, **kwargs)[0]
        return prediction_to_x0(x_t.float(), prediction.float(), alpha, sigma, self.prediction)

    def _time_ids(self, height: int, width: int, device) -> Tensor:
        """SDXL's size conditioning, built once per size and device."""
        key = (height, width, str(device))
        cache = self.__dict__.setdefault("_time_id_cache", {})
        if key not in cache:
            cache[key] = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        return cache[key]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        cond = self._encode(prompts)
        if self.uncond_mode != "zeros":
            return cond
        # DMD2's SDXL choice: the unconditional input is all zeros rather than the encoded empty prompt.
        empty = torch.tensor([p == "" for p in prompts])
        return Conditioning({name: torch.where(append_dims(empty.to(v.device), v.ndim), torch.zeros_like(v), v)
                             for name, v in cond.tensors.items()})

    def _encode(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            device = next(encoder.parameters()).device
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            output = encoder(ids, output_hidden_states=self.is_sdxl)
            if self.is_sdxl:
                hidden.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
                if hasattr(output, "text_embeds"):
                    pooled = output.text_embeds
            else:
                hidden.append(output.last_hidden_state)
        tensors = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
        if self.is_sdxl:
            tensors["text_embeds"] = pooled.float()
        return Conditioning(tensors)

    # --- the rest ----------------------------------------------------------------------------------------
    def default_lora_target_modules(self) -> list[str]:
        return list(UNET_LORA_TARGETS)

    def lora_aliases(self) -> dict[str, str]:
        from ..formats import lora_aliases, lora_module_names

        ldm = lora_module_names(self.unet_ldm_keys or {})
        aliases: dict[str, str] = {}
        for name, module in self.network.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                aliases.update(lora_aliases(name, name, ldm.get(name)))
        return aliases

    def enable_gradient_checkpointing(self, network: nn.Module) -> None:
        network.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self, network: nn.Module) -> None:
        network.disable_gradient_checkpointing()

    def offload_text_encoders(self) -> None:
        for encoder in self.text_encoders:
            encoder.to("cpu")

    def place(self, device, weight_dtype) -> None:
        self.network.to(device=device, dtype=weight_dtype)
        for encoder in self.text_encoders:
            encoder.to(device=device, dtype=weight_dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=torch.float32)  # SD VAEs overflow in fp16

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return super().decode(latents)
        config = self.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        parameter = next(self.vae.parameters())
        # one image at a time: a VAE decode at 1024 px needs several GiB of activations per image
        images = torch.cat([self.vae.decode(latent[None].to(parameter.device, parameter.dtype), return_dict=False)[0]
                            for latent in latents])
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _diffusers_unet_file(folder: str) -> str | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        path = os.path.join(folder, "unet", name)
        if os.path.isfile(path):
            return path
    return None


def _meta_parameter_count(path: str, folder: str) -> int:
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = AutoConfig.from_pretrained(path, subfolder=folder, local_files_only=True)
    cls = CLIPTextModelWithProjection if "WithProjection" in "".join(config.architectures or []) else CLIPTextModel
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def read_scheduler_config(path: str, local: bool) -> dict:
    """A diffusers model's scheduler/scheduler_config.json (a folder, or a Hugging Face id)."""
    import json

    if local:
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as handle:
            return json.load(handle)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(path, "scheduler/scheduler_config.json"), encoding="utf-8") as handle:
        return json.load(handle)
