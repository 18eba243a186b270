"""Build a `DiffusersAdapter` from an SD1.5 / SDXL single-file (LDM layout) checkpoint, with no network access.

Only safetensors are read (`formats.inspect_checkpoint` detects the family, prediction type and UNet config from
the header); the CLIP tokenizer comes from `tokenizer_path` (or the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import Tensor

from .. import ldm_layout as layout
from ..config import error_summary
from ..formats import CheckpointError, clip_l_state, inspect_checkpoint, open_clip_to_hf

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")
CLIP_HUB_REPO = "openai/clip-vit-large-patch14"
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def resolve_tokenizer_folder(tokenizer_path: str | None) -> str:
    """A folder with CLIP's BPE files: `tokenizer_path`, else openai/clip-vit-large-patch14 in the HF cache."""
    if tokenizer_path:
        if not os.path.isdir(tokenizer_path):
            raise CheckpointError(f"tokenizer_path: {tokenizer_path!r} is not a folder; give a folder with the CLIP "
                                  f"BPE files {' and '.join(CLIP_TOKENIZER_FILES)}")
        missing = [f for f in CLIP_TOKENIZER_FILES if not os.path.isfile(os.path.join(tokenizer_path, f))]
        if missing:
            raise CheckpointError(f"tokenizer_path: {tokenizer_path!r} lacks {', '.join(missing)}; it needs the CLIP "
                                  "BPE files vocab.json and merges.txt (as in openai/clip-vit-large-patch14 or "
                                  "ComfyUI's comfy/sd1_tokenizer)")
        return tokenizer_path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(CLIP_HUB_REPO, f) for f in CLIP_TOKENIZER_FILES]
    except Exception:  # noqa: BLE001 - an unusable cache is the same as no cache
        found = [None, None]
    if all(isinstance(f, str) for f in found):
        return os.path.dirname(found[0])
    raise CheckpointError("single-file checkpoints carry no tokenizer: set tokenizer_path to a folder with the CLIP "
                          "BPE files vocab.json and merges.txt (a download of openai/clip-vit-large-patch14, or "
                          f"ComfyUI's comfy/sd1_tokenizer); the Hugging Face cache has no {CLIP_HUB_REPO} either")


def load_single_file(path: str, tokenizer_path: str | None = None, v_parameterization: bool | None = None,
                     uncond_mode: str = "empty_prompt", dtype=torch.float32, load_vae: bool = True):
    """Load an SD1.5/SDXL single-file checkpoint as a `DiffusersAdapter`, with no network access.

    A file whose tensors do not build the model (one missing, misshapen or of an integer type) gets one line
    naming the file and the tensor, never a traceback."""
    try:
        adapter = _load_single_file(path, tokenizer_path, v_parameterization, uncond_mode, dtype, load_vae)
    except CheckpointError as error:
        name = os.path.basename(path)
        if name in str(error) or "tokenizer" in str(error):
            raise
        raise CheckpointError(f"{name}: {error}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, StopIteration, AttributeError) as error:
        raise CheckpointError(f"{os.path.basename(path)}: its tensors do not build an SD1.5/SDXL model "
                              f"({type(error).__name__}: {error_summary(error)}); the file is damaged or "
                              "incomplete") from None
    modules = {"UNet": adapter.network, "VAE": adapter.vae,
               **{f"text encoder {i + 1}": e for i, e in enumerate(adapter.text_encoders)}}
    for part, module in modules.items():
        for name, parameter in (module.named_parameters() if module is not None else []):
            if not parameter.is_floating_point():
                raise CheckpointError(f"{os.path.basename(path)}: {part} weight {name} is stored as "
                                      f"{parameter.dtype}, not a float; the file is damaged")
    return adapter


def _load_single_file(path: str, tokenizer_path: str | None, v_parameterization: bool | None, uncond_mode: str,
                      dtype, load_vae: bool):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from ..schedules import DiscreteVPSchedule
    from .diffusers import DiffusersAdapter

    info = inspect_checkpoint(path, v_parameterization)
    tokenizer_folder = resolve_tokenizer_folder(tokenizer_path)
    shapes = info.shapes

    def tensors(prefix: str) -> dict[str, Tensor]:
        with safe_open(path, framework="pt") as handle:
            return {k[len(prefix):]: _to_dtype(handle.get_tensor(k), dtype)
                    for k in handle.keys() if k.startswith(prefix)}

    encoders, tokenizers = [], []
    if info.family == "sd15":
        clip_l = clip_l_state(tensors(layout.SD15_CLIP_PREFIX))
        encoders.append(_build_clip(clip_l, projection=False, act="quick_gelu", tokenizer_folder=tokenizer_folder))
        tokenizers.append(_tokenizer(tokenizer_folder, encoders[0], pad_token=None))
    else:
        clip_l = clip_l_state(tensors(layout.SDXL_CLIP_L_PREFIX))
        encoders.append(_build_clip(clip_l, projection=False, act="quick_gelu", tokenizer_folder=tokenizer_folder))
        clip_g = open_clip_to_hf(tensors(layout.SDXL_CLIP_G_PREFIX))
        encoders.append(_build_clip(clip_g, projection=True, act="gelu", tokenizer_folder=tokenizer_folder))
        tokenizers.append(_tokenizer(tokenizer_folder, encoders[0], pad_token=None))
        tokenizers.append(_tokenizer(tokenizer_folder, encoders[1], pad_token="!"))  # OpenCLIP pads with "!"
        pooled = encoders[1].config.projection_dim
        adm = info.unet_config["projection_class_embeddings_input_dim"]
        if (adm - pooled) % 6:
            raise CheckpointError(f"{os.path.basename(path)}: ADM input {adm} does not fit a pooled embedding of "
                                  f"{pooled} plus 6 size embeddings")
        info.unet_config["addition_time_embed_dim"] = (adm - pooled) // 6

    unet_state = {layout.UNET_PREFIX + k: v for k, v in tensors(layout.UNET_PREFIX).items()}
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**info.unet_config)
    key_map = layout.unet_key_map(dict(unet.config), unet.state_dict().keys())
    missing = [k for k, ldm in key_map.items() if layout.UNET_PREFIX + ldm not in unet_state]
    if missing:
        raise CheckpointError(f"{os.path.basename(path)}: UNet tensors missing for {missing[:3]}; the file is damaged")
    unet.load_state_dict({k: unet_state[layout.UNET_PREFIX + ldm] for k, ldm in key_map.items()},
                         strict=True, assign=True)
    del unet_state

    vae = None
    if load_vae and info.has_vae:
        vae = _load_vae(tensors(layout.VAE_PREFIX), shapes, info.family)
    for module in [unet, vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval()
    adapter = DiffusersAdapter(unet, encoders, tokenizers, DiscreteVPSchedule.scaled_linear(), info.prediction_type,
                               vae=vae, uncond_mode=uncond_mode)
    adapter.source_checkpoint = os.path.abspath(path)
    adapter.unet_ldm_keys = key_map
    return adapter


def _to_dtype(tensor: Tensor, dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _build_clip(state: dict[str, Tensor], projection: bool, act: str, tokenizer_folder: str):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state
                     for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)] if m)
    special = _special_token_ids(tokenizer_folder)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(1, hidden // layout.CLIP_HEAD_CHANNELS),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=state["text_projection.weight"].shape[0] if projection else hidden,
        hidden_act=act, **special)
    with init_empty_weights(include_buffers=False):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    state = _native_clip_names(model, state)
    expected = set(model.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise CheckpointError(f"text encoder tensors do not fit a CLIP text model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _native_clip_names(model, state: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _special_token_ids(tokenizer_folder: str) -> dict[str, int]:
    with open(os.path.join(tokenizer_folder, "vocab.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)
    bos, eos = vocab.get("<|startoftext|>"), vocab.get("<|endoftext|>")
    if bos is None or eos is None:
        raise CheckpointError(f"tokenizer_path: {tokenizer_folder!r}/vocab.json lacks CLIP's <|startoftext|> / "
                              "<|endoftext|> tokens; is it a CLIP tokenizer?")
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}


def _tokenizer(folder: str, encoder, pad_token: str | None):
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    tokenizer.model_max_length = encoder.config.max_position_embeddings
    if len(tokenizer) > encoder.config.vocab_size:
        raise CheckpointError(f"tokenizer_path: {folder!r} has {len(tokenizer)} tokens but the text encoder only "
                              f"{encoder.config.vocab_size}; it is not this model's tokenizer")
    return tokenizer


def _load_vae(state: dict[str, Tensor], shapes: dict, family: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    prefix = layout.VAE_PREFIX
    levels = 1 + max(int(m.group(1)) for k in shapes
                     for m in [re.match(r"first_stage_model\.encoder\.down\.(\d+)\.", k)] if m)
    channels = [shapes[f"{prefix}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    config = {
        "in_channels": shapes[f"{prefix}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{prefix}decoder.conv_out.weight"][0],
        "latent_channels": shapes[f"{prefix}post_quant_conv.weight"][0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": 1 + max(int(m.group(1)) for k in shapes
                                    for m in [re.match(r"first_stage_model\.encoder\.down\.0\.block\.(\d+)\.", k)]
                                    if m),
        "scaling_factor": VAE_SCALING[family],
    }
    converted = convert_ldm_vae_checkpoint({prefix + k: v for k, v in state.items()}, config)
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae

