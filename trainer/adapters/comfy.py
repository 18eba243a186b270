"""ComfyUI adapter: a `ModelAdapter` over ComfyUI's MODEL (ModelPatcher), CLIP and VAE.

The only module of the trainer that imports `comfy` (lazily, inside functions): the rest of the package and the
node classes import without ComfyUI.

Latent space. The trainer works in the latent space the UNet sees: VAE latents after
``latent_format.process_in`` (SD1.5 x 0.18215, SDXL x 0.13025), in variance-preserving coordinates
``x_t = alpha * x0 + sigma * noise`` of the schedule built from the model's own ``model_sampling.sigmas``.
ComfyUI indexes the same point by its k-diffusion sigma ``s = sigma / alpha`` and the unscaled input
``x_t / alpha = x0 + s * noise``; `predict_x0` converts to that and calls the model's own ``apply_model`` (which
applies ``calculate_input``, ``timestep`` and ``calculate_denoised`` of its ``model_sampling``): nothing about
eps/v prediction is re-derived here.

One copy of the base weights. Inside a node, ComfyUI's weights are inference tensors, which autograd cannot
save for backward. `trainable_unet` loads a clone of the MODEL (so LoRAs applied upstream are baked into the
weights being distilled), replaces each parameter of the shared UNet by an equal normal tensor one at a time
(the peak extra memory is one tensor), and lets the trainer inject its peft adapters. On exit it removes every
adapter and wrapper it added; the UNet then holds equal, normal, frozen tensors and keeps serving ComfyUI.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..denoiser import Conditioning, ModelAdapter
from ..errors import public_name
from ..schedules import DiscreteVPSchedule, append_dims

logger = logging.getLogger(__name__)

# LoRA targets in ComfyUI's LDM UNet: attention + feed-forward, resnet convs and time projection, resamplers.
# (The diffusers adapter's list in LDM names; conv skip connections are added per model, see below.)
LDM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "in_layers.2", "out_layers.3", "emb_layers.1", "op", "conv",
]
SUPPORTED_FAMILIES = "SD1.5 and SDXL (eps or v-prediction)"
CLIP_CHUNK = 77  # tokens per CLIP window


@public_name
class UnsupportedModelError(ValueError):
    """A MODEL this trainer cannot distil; the message says which models it takes."""


@dataclass
class Teacher:
    """What the Load Teacher node hands to the train node: ComfyUI objects plus the detected settings."""

    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    family: str
    prediction_type: str
    guidance_scale: float
    uncond_mode: str = "empty_prompt"
    description: str = field(default="")


def detect_family(model) -> tuple[str, str]:
    """(family, prediction_type) of a ComfyUI MODEL, or UnsupportedModelError naming what it is."""
    import comfy.model_sampling
    import comfy.supported_models as supported

    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    if isinstance(config, supported.SDXL) and not isinstance(config, supported.SDXL_instructpix2pix):
        family = "sdxl"
    elif isinstance(config, supported.SD15) and not isinstance(config, supported.SD15_instructpix2pix):
        family = "sd15"
    else:
        raise UnsupportedModelError(
            f"this MODEL is {name}; Decoupled DMD in ComfyUI distils {SUPPORTED_FAMILIES} checkpoints: load one "
            "with Load Checkpoint (LoRAs may be applied on it)")
    if config.unet_config.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"this {name} MODEL has {config.unet_config['in_channels']} input channels "
                                    "(inpainting/edit model); use a plain text-to-image checkpoint")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise UnsupportedModelError(
            f"this {name} MODEL samples with {type(sampling).__name__}; only the discrete 1000-step schedule is "
            "supported (remove ModelSampling* nodes other than ModelSamplingDiscrete eps/v_prediction)")
    denoised = type(sampling).calculate_denoised  # the parameterisation, judged by what it computes
    if denoised is comfy.model_sampling.EPS.calculate_denoised:
        prediction = "epsilon"
    elif denoised is comfy.model_sampling.V_PREDICTION.calculate_denoised:
        prediction = "v_prediction"
    else:
        raise UnsupportedModelError(f"this {name} MODEL predicts with {type(sampling).__name__}; "
                                    "supported: eps or v_prediction")
    if sampling.sigmas.numel() != 1000:
        raise UnsupportedModelError(f"this {name} MODEL has a {sampling.sigmas.numel()}-step schedule "
                                    f"({type(sampling).__name__}); the teacher needs its 1000-step training schedule")
    return family, prediction


def make_teacher(model, clip, vae, guidance_scale: float | None = None, uncond_mode: str = "empty_prompt") -> Teacher:
    """Validate a MODEL/CLIP/VAE triple as a teacher; guidance_scale None takes the family default (SDXL 8)."""
    from ..denoiser import FAMILY_GUIDANCE_DEFAULTS

    family, prediction = detect_family(model)
    if clip is None:
        raise UnsupportedModelError("no CLIP: connect the CLIP output of the checkpoint loader")
    if vae is None:
        raise UnsupportedModelError("no VAE: connect the VAE output of the checkpoint loader (previews need it)")
    if uncond_mode not in ("empty_prompt", "zeros"):
        raise ValueError(f"uncond_mode {uncond_mode!r}: choose empty_prompt or zeros")
    if guidance_scale is not None and not 1.0 <= guidance_scale <= 30.0:
        raise ValueError(f"guidance_scale {guidance_scale}: use a value from 1 to 30, or auto (the family default)")
    scale = FAMILY_GUIDANCE_DEFAULTS.get(family, 5.0) if guidance_scale is None else guidance_scale
    return Teacher(model, clip, vae, family, prediction, float(scale), uncond_mode,
                   f"{family} {prediction} ({type(model.model.model_config).__name__})")


class ComfyAdapter(ModelAdapter):
    """The teacher as the trainer sees it; build it with `trainable_unet`, which prepares the UNet."""

    def __init__(self, teacher: Teacher, base_model):
        self.teacher = teacher
        self.base_model = base_model  # comfy.model_base.BaseModel, loaded by `trainable_unet`
        self.network = base_model.diffusion_model
        self.family, self.prediction_type = teacher.family, teacher.prediction_type
        self.uncond_mode = teacher.uncond_mode
        sampling = base_model.model_sampling
        self.schedule = DiscreteVPSchedule.from_k_sigmas(sampling.sigmas.detach().cpu().double().clone())
        self.latent_format = base_model.latent_format
        self.latent_channels = int(self.latent_format.latent_channels)
        self.latent_downscale = 8
        size = 1024 if self.family == "sdxl" else 512
        self.default_resolution = (size, size)
        self.source_checkpoint = None  # the MODEL may carry LoRAs: merged checkpoints go through ComfyUI's saver
        self.source_model = f"comfyui:{type(base_model.model_config).__name__}"
        # ComfyUI's UNet is already in LDM layout: kohya keys are lora_unet_<its own path>.
        self.unet_ldm_keys = {name: name for name in self.network.state_dict()}
        self._checkpointed: list[nn.Module] = []

    # --- the denoiser --------------------------------------------------------------------------------------
    def predict_x0(self, network: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        if network is not self.network and getattr(network, "module", None) is not self.network:
            raise ValueError("the ComfyUI adapter runs the UNet through its BaseModel; pass adapter.network")
        level = torch.as_tensor(level, dtype=torch.float64, device=x_t.device)
        alpha, sigma = self.schedule.alpha_sigma(level)
        k_sigma = (sigma / alpha).to(torch.float32)
        x = x_t.float() / append_dims(alpha.to(torch.float32), x_t.ndim)  # ComfyUI's x0 + s * noise
        height, width = (s * self.latent_downscale for s in x_t.shape[-2:])
        kwargs = self.base_model.extra_conds(cross_attn=cond["c_crossattn"], pooled_output=cond["pooled_output"],
                                             device=x.device, noise=x, width=width, height=height)
        kwargs = {name: value.cond for name, value in kwargs.items()}
        return self.base_model.apply_model(x, k_sigma, transformer_options={}, **kwargs).float()

    def merged_checkpoint_problem(self) -> str | None:
        return ("save_merged_checkpoint: in ComfyUI the all-in-one checkpoint is written with ComfyUI's own saver "
                "(the Train node's save_checkpoint input); set save_merged_checkpoint = false for this trainer")

    def memory_available_bytes(self, device: str) -> int:
        """ComfyUI's own free-memory figure for its device (models it keeps loaded are not free) plus the UNet's
        weights, which are loaded already and which the plan counts."""
        import comfy.model_management as mm

        held = sum(t.numel() * t.element_size() for t in [*self.network.parameters(), *self.network.buffers()]
                   if t.device.type != "meta")
        return int(mm.get_free_memory(mm.get_torch_device()) + held)

    def planning_skeleton(self):
        """The same UNet as a diffusers module on the meta device, its config read from this UNet's LDM weight
        shapes: ComfyUI's apply_model consults device memory and copies tables, which meta tensors refuse."""
        from diffusers import UNet2DConditionModel

        from ..ldm_layout import unet_config_from_ldm
        from ..schedules import DiscreteVPSchedule
        from .diffusers import DiffusersAdapter

        shapes = {name.replace(".base_layer.", "."): tuple(t.shape) for name, t in self.network.state_dict().items()
                  if "lora_" not in name}
        config = unet_config_from_ldm(shapes, self.family)
        if config.get("addition_embed_type") == "text_time":
            config["addition_time_embed_dim"] = (config["projection_class_embeddings_input_dim"] - 1280) // 6
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config).requires_grad_(False)
        skeleton = DiffusersAdapter(unet, [], [], DiscreteVPSchedule(self.schedule.alphas_cumprod), "epsilon")
        skeleton.latent_downscale, skeleton.default_resolution = self.latent_downscale, self.default_resolution
        return skeleton

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """CLIP.encode_from_tokens per prompt (first 77-token window; ComfyUI weights like (word:1.2) apply)."""
        crossattn, pooled = [], []
        for prompt in prompts:
            cond, pool = self.teacher.clip.encode_from_tokens(self.teacher.clip.tokenize(prompt), return_pooled=True)
            if cond.shape[1] > CLIP_CHUNK:
                logger.info("prompt longer than %d tokens, trained on its first window: %.60s", CLIP_CHUNK, prompt)
            crossattn.append(cond[:, :CLIP_CHUNK].float().clone())
            pooled.append(pool.float().clone())
        tensors = {"c_crossattn": torch.cat(crossattn), "pooled_output": torch.cat(pooled)}
        if self.uncond_mode == "zeros":  # DMD2's SDXL unconditional input: zeros, not the encoded empty prompt
            empty = torch.tensor([p == "" for p in prompts])
            tensors = {k: torch.where(append_dims(empty, v.ndim), torch.zeros_like(v), v) for k, v in tensors.items()}
        return Conditioning(tensors)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        images = self.teacher.vae.decode(self.latent_format.process_out(latents.float().cpu()))
        return images[..., :3].movedim(-1, 1).float().clamp(0.0, 1.0).cpu()  # (B, H, W, C) -> (B, 3, H, W)

    # --- the rest ----------------------------------------------------------------------------------------
    def _diffusers_module_names(self) -> dict[str, str]:
        """{LDM module: diffusers module} from ComfyUI's own map (the one its LoraLoader reads)."""
        import comfy.utils

        to_diffusers = {}
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(self.base_model.model_config.unet_config).items():
            if diffusers_key.endswith(".weight"):
                to_diffusers[ldm_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
        return to_diffusers

    def kohya_lora_names(self) -> dict[str, str]:
        """ComfyUI's UNet has LDM names: kohya's SDXL paths as they are, its SD1.5 paths through ComfyUI's map."""
        from ..formats import kohya_module_names, lora_module_names

        ldm = {module: module for module in lora_module_names(self.unet_ldm_keys)}
        to_diffusers = self._diffusers_module_names() if self.family != "sdxl" else {}
        return kohya_module_names(self.family, ldm, {module: to_diffusers.get(module, module) for module in ldm})

    def lora_aliases(self) -> dict[str, str]:
        """ComfyUI's UNet has LDM names; diffusers names come from ComfyUI's own map (as its LoraLoader reads)."""
        from ..formats import lora_aliases

        to_diffusers = self._diffusers_module_names()
        aliases: dict[str, str] = {}
        for name, module in self.network.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                aliases.update(lora_aliases(name, to_diffusers.get(name), name))
        return aliases

    def default_lora_target_modules(self) -> list[str]:
        # Suffix names as peft matches them; conv skip connections by full name (an Identity must not match).
        skips = [name for name, module in self.network.named_modules()
                 if name.endswith("skip_connection") and isinstance(module, nn.Conv2d)]
        return list(LDM_LORA_TARGETS) + skips

    def enable_gradient_checkpointing(self, network: nn.Module) -> None:
        """Recompute each top-level UNet block in backward (as ComfyUI's own trainer does); undone on exit."""
        import functools

        from torch.utils.checkpoint import checkpoint

        blocks = [*self.network.input_blocks, self.network.middle_block, *self.network.output_blocks]
        for block in blocks:
            block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
            self._checkpointed.append(block)

    def release(self) -> None:
        """Undo everything training added to the shared UNet: peft layers, wrapped forwards, grad flags."""
        for block in self._checkpointed:
            block.__dict__.pop("forward", None)
        self._checkpointed.clear()
        remove_lora_layers(self.network)
        for attribute in ("forward", "_original_forward", "_converted_to_transformer_engine"):
            self.network.__dict__.pop(attribute, None)  # accelerate's mixed-precision forward
        self.network.requires_grad_(False)
        self.network.train(False)


def remove_lora_layers(network: nn.Module) -> int:
    """Put back every module peft wrapped (its base layer); returns how many were removed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    wrapped = [(name, module) for name, module in network.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, module.get_base_layer())
    return len(wrapped)


def _make_trainable(module: nn.Module) -> int:
    """Replace each inference-tensor parameter/buffer by an equal normal tensor, one at a time."""
    replaced = 0
    for owner in module.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is not None and parameter.is_inference():
                owner._parameters[name] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
                replaced += 1
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.is_inference():
                owner._buffers[name] = buffer.detach().clone()
                replaced += 1
    return replaced


def partial_loading_problem(vram_state: str) -> str | None:
    """Why the Train node will not train under ComfyUI's VRAM mode `vram_state` (a VRAMState name), or None.

    The UNet is loaded whole for training (`force_full_load`), which ComfyUI honours in every mode but NO_VRAM:
    there it keeps the weights in system RAM and streams them to the GPU for every call, a run many times
    slower than it should be. --lowvram is fine: the memory plan checks first that the whole UNet fits."""
    if vram_state == "NO_VRAM":
        return ("ComfyUI runs with --novram: it would keep the UNet's weights in system RAM and stream them to the "
                "GPU for every call, so training would be many times slower. Restart ComfyUI without --novram to "
                "train (--lowvram is fine: the Train node loads the UNet whole after checking that it fits)")
    return None


@contextlib.contextmanager
def trainable_unet(teacher: Teacher):
    """Load the teacher MODEL (with its patches) and yield a `ComfyAdapter` whose UNet autograd can train.

    Must run under ``torch.inference_mode(False)``. Leaves the shared model working (adapters removed) however
    the block exits."""
    import comfy.model_management as mm

    if torch.is_inference_mode_enabled():
        raise RuntimeError("trainable_unet needs torch.inference_mode(False)")
    problem = partial_loading_problem(mm.vram_state.name)
    if problem:
        raise ValueError(problem)
    patcher = teacher.model.clone()
    mm.unload_all_models()  # what ComfyUI can free before training: other models, cached; reloaded when needed
    mm.soft_empty_cache()
    mm.load_models_gpu([patcher], force_full_load=True)
    base = patcher.model
    replaced = _make_trainable(base.diffusion_model)
    logger.debug("%d inference tensors of the UNet replaced by normal ones", replaced)
    if patcher.model_options.get("transformer_options", {}).get("patches") or \
            patcher.model_options.get("model_function_wrapper"):
        logger.warning("the teacher MODEL carries attention patches or a model wrapper; training calls the UNet "
                       "without them (weight patches such as LoRAs are included)")
    adapter = ComfyAdapter(teacher, base)
    try:
        yield adapter
    finally:
        adapter.release()
