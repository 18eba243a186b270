"""Single-file (LDM layout) SD1.5 / SDXL checkpoints: detection from the header alone, the text encoders' key
layouts (CLIP-L, OpenCLIP-G), and writing: the all-in-one checkpoint (the user's own file with only the UNet
tensors replaced, every other tensor copied byte for byte, streamed, so a multi-GB checkpoint never sits in memory
twice) and an LDM export of diffusers-built parts.

Building models from a single file is the adapters' job (`adapters/single_file.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ldm_layout as layout
from ..outputs import atomic_write
from .safetensors_io import CheckpointError, read_safetensors_header, tensor_shapes, write_safetensors_stream

logger = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    """What a single-file checkpoint holds, read from its header alone."""

    path: str
    family: str  # sd15 | sdxl
    prediction_type: str  # epsilon | v_prediction
    unet_config: dict
    has_vae: bool
    metadata: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)  # every tensor's shape, from the header


def inspect_checkpoint(path: str, v_parameterization: bool | None = None) -> CheckpointInfo:
    """Detect an SD1.5 or SDXL single-file checkpoint from its tensor names and shapes; refuse anything else."""
    header, _ = read_safetensors_header(path)
    shapes = tensor_shapes(header)
    name = os.path.basename(path)
    if not shapes:
        raise CheckpointError(f"{name}: holds no tensors")
    if any(".lora_" in k or k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k for k in shapes):
        raise CheckpointError(f"{name} is a LoRA, not a checkpoint: give the base checkpoint it was trained for, "
                              "and apply the LoRA with a LoraLoader before the Load Teacher node")
    unet = {k[len(layout.UNET_PREFIX):]: s for k, s in shapes.items() if k.startswith(layout.UNET_PREFIX)}
    if any(k.startswith(("double_blocks.", "joint_blocks.", "transformer_blocks.")) for k in unet) \
            or any(k.startswith(("double_blocks.", "single_blocks.")) for k in shapes):
        raise CheckpointError(f"{name}: a transformer (Flux / SD3-style) model; only SD1.5 and SDXL UNets are "
                              "supported")
    if not unet:
        if any(k.startswith("input_blocks.") for k in shapes):
            raise CheckpointError(f"{name}: a UNet-only file (no text encoders); give a full checkpoint that holds "
                                  "the text encoders too (model.diffusion_model.* and "
                                  "cond_stage_model.*/conditioner.*)")
        raise CheckpointError(f"{name}: no `model.diffusion_model.*` tensors; not an SD1.5/SDXL single-file checkpoint")
    if "input_blocks.0.0.weight" not in unet or "out.2.weight" not in unet:
        raise CheckpointError(f"{name}: the UNet is incomplete (no input_blocks.0.0 / out.2); the file is damaged")
    proj_in = [s for k, s in unet.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj_in) and len(proj_in[0]) == 2
    has_adm = "label_emb.0.0.weight" in unet
    has_clip_l = any(k.startswith((layout.SD15_CLIP_PREFIX, layout.SDXL_CLIP_L_PREFIX)) for k in shapes)
    has_clip_g = any(k.startswith(layout.SDXL_CLIP_G_PREFIX) for k in shapes)
    if has_adm and linear and has_clip_l and has_clip_g:
        family = "sdxl"
    elif not has_adm and not linear and has_clip_l:
        family = "sd15"
    elif has_adm and not has_clip_l:
        raise CheckpointError(f"{name}: an SDXL refiner (OpenCLIP-G only); distil an SDXL base checkpoint instead")
    elif not has_adm and linear:
        raise CheckpointError(f"{name}: a Stable Diffusion 2.x checkpoint; only SD1.5 and SDXL are supported")
    else:
        raise CheckpointError(f"{name}: unknown architecture (ADM input {has_adm}, linear proj_in {linear}, "
                              f"CLIP-L {has_clip_l}, OpenCLIP-G {has_clip_g}); only SD1.5 and SDXL are supported")
    if unet["input_blocks.0.0.weight"][1] != 4:
        raise CheckpointError(f"{name}: the UNet takes {unet['input_blocks.0.0.weight'][1]} input channels "
                              "(an inpainting or instruct model?); only plain 4-channel text-to-image UNets")
    try:
        config = layout.unet_config_from_ldm(unet, family)
    except (KeyError, ValueError, StopIteration) as error:
        raise CheckpointError(f"{name}: cannot derive the UNet layout from its tensors ({error})") from None
    prediction_type = "v_prediction" if "v_pred" in shapes else "epsilon"
    if v_parameterization is not None:
        wanted = "v_prediction" if v_parameterization else "epsilon"
        if wanted != prediction_type:
            logger.warning("%s: v_parameterization=%s overrides the file (%s)", name, v_parameterization,
                           prediction_type)
        prediction_type = wanted
    return CheckpointInfo(path, family, prediction_type, config, any(k.startswith(layout.VAE_PREFIX) for k in shapes),
                          header.get("__metadata__", {}) or {}, shapes)


# --- text encoder key layouts ----------------------------------------------------------------------------------
def clip_l_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Old SD1.x files store the CLIP transformer without the `text_model.` level.
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def open_clip_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text tower (SDXL's second encoder) -> transformers CLIPTextModelWithProjection names."""
    layers = 1 + max(int(m.group(1)) for k in state for m in [re.match(r"transformer\.resblocks\.(\d+)\.", k)] if m)
    hidden = state["token_embedding.weight"].shape[1]
    out = {}
    inverse = {}
    probe = [f"text_model.encoder.layers.{i}.{p}.{leaf}" for i in range(layers) for leaf in ("weight", "bias")
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")]
    probe += ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias", "text_projection.weight"]
    for hf_key, oc_key in layout.open_clip_key_map(probe, layers).items():
        inverse.setdefault(oc_key, []).append(hf_key)
    for oc_key, hf_keys in inverse.items():
        if oc_key not in state:
            raise CheckpointError(f"OpenCLIP text encoder tensor {layout.SDXL_CLIP_G_PREFIX}{oc_key} is missing; "
                                  "the file is damaged or incomplete")
        value = state[oc_key]
        if oc_key.endswith(("in_proj_weight", "in_proj_bias")):
            for index, hf_key in enumerate(sorted(hf_keys, key=_qkv_order)):
                out[hf_key] = value[index * hidden:(index + 1) * hidden]
        elif oc_key == "text_projection":
            out[hf_keys[0]] = value.t().contiguous()  # OpenCLIP applies x @ P; a Linear stores P^T
        else:
            out[hf_keys[0]] = value
    return out


def _qkv_order(key: str) -> int:
    return next(i for i, p in enumerate(("q_proj", "k_proj", "v_proj")) if p in key)



def canonical_clip_state(encoder) -> dict[str, Tensor]:
    """A CLIP text model's weights under the `text_model.*` names LDM files use (transformers 5 dropped the
    prefix on CLIPTextModel)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
            for k, v in encoder.state_dict().items()}


def hf_to_open_clip(encoder) -> dict[str, Tensor]:
    state = canonical_clip_state(encoder)
    mapping = layout.open_clip_key_map(state.keys(), encoder.config.num_hidden_layers)
    out, qkv = {}, {}
    for key, oc_key in mapping.items():
        if oc_key.endswith(("in_proj_weight", "in_proj_bias")):
            qkv.setdefault(oc_key, {})[_qkv_order(key)] = state[key]
        elif oc_key == "text_projection":
            out[oc_key] = state[key].t().contiguous()
        else:
            out[oc_key] = state[key]
    for oc_key, parts in qkv.items():
        out[oc_key] = torch.cat([parts[i] for i in range(3)])
    out["logit_scale"] = torch.tensor(4.6052)  # ln(100): part of every OpenCLIP state, unused for text conditioning
    return {layout.SDXL_CLIP_G_PREFIX + k: v for k, v in out.items()}


# --- writing --------------------------------------------------------------------------------------------------
def write_merged_checkpoint(source_path: str, output_path: str, unet_ldm_keys: dict[str, str],
                            metadata: dict[str, str], prediction_type: str, deltas: dict | None = None,
                            unet_state: dict[str, Tensor] | None = None, overwrite: bool = False) -> str:
    """The source checkpoint with the student in its UNet, in the source's layout and dtypes.

    deltas (LoRA): {diffusers weight name: delta tensor, or a callable returning it}, added in float32 to the
    file's own tensor; unet_state (full training): every UNet tensor replaced. All other tensors are copied
    byte for byte, streamed. Returns the path written (a counter is added unless `overwrite`).
    """
    from safetensors import safe_open

    header, data_start = read_safetensors_header(source_path)
    source_unet = {k for k in header if k.startswith(layout.UNET_PREFIX)}
    trained = unet_state if unet_state is not None else deltas or {}
    by_ldm = {layout.UNET_PREFIX + unet_ldm_keys[k]: v for k, v in trained.items()}
    if not set(by_ldm) <= source_unet or (unet_state is not None and set(by_ldm) != source_unet):
        raise CheckpointError(f"the trained UNet does not match {os.path.basename(source_path)}: "
                              f"{sorted(source_unet ^ set(by_ldm))[:3]} differ; merge into the checkpoint the "
                              "student was trained from")

    def merged(name: str, value) -> Tensor:
        value = value() if callable(value) else value
        if unet_state is not None:
            return value
        with safe_open(source_path, framework="pt") as handle:
            return handle.get_tensor(name).float() + value.float()

    entries = []
    for name, entry in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                              key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        if name in by_ldm:
            shape = tuple(by_ldm[name].shape) if unet_state is not None else tuple(entry["shape"])
            if list(shape) != entry["shape"]:
                raise CheckpointError(f"{name}: trained shape {list(shape)} differs from the file's {entry['shape']}")
            entries.append((name, entry["dtype"], entry["shape"],
                            (functools.partial(merged, name, by_ldm[name]), end - begin)))
        else:
            entries.append((name, entry["dtype"], entry["shape"], (source_path, data_start + begin, end - begin)))
    if prediction_type == "v_prediction" and "v_pred" not in header:
        entries.append(("v_pred", "F32", [0], b""))  # ComfyUI's marker, so stock loaders sample it as v
    merged_metadata = {**(header.get("__metadata__") or {}), **metadata}
    return atomic_write(output_path, lambda staging: write_safetensors_stream(staging, entries, merged_metadata),
                        overwrite=overwrite)


def write_ldm_checkpoint(path: str, *, family: str, unet, text_encoders: list, vae, prediction_type: str,
                         metadata: dict[str, str] | None = None, overwrite: bool = False,
                         unet_state: dict[str, Tensor] | None = None, dtype=None) -> str:
    """Diffusers-built SD1.5/SDXL parts as one LDM-layout safetensors file.

    family: sd15 | sdxl; unet: a diffusers UNet (its config names the layout; its weights are written unless
    `unet_state` replaces them); text_encoders: [CLIP-L] (sd15) or [CLIP-L, OpenCLIP-G] (sdxl), transformers
    models; vae: a diffusers AutoencoderKL, or None for a file without one; prediction_type: v_prediction adds
    ComfyUI's `v_pred` marker. Returns the path written (a counter is added unless `overwrite`).
    """
    from safetensors.torch import save_file

    unet_state = unet_state if unet_state is not None else unet.state_dict()
    keys = layout.unet_key_map(dict(unet.config), unet_state.keys())
    tensors = {layout.UNET_PREFIX + keys[k]: v for k, v in unet_state.items()}
    if family == "sd15":
        tensors.update({layout.SD15_CLIP_PREFIX + k: v for k, v in canonical_clip_state(text_encoders[0]).items()})
    elif family == "sdxl":
        tensors.update({layout.SDXL_CLIP_L_PREFIX + k: v
                        for k, v in canonical_clip_state(text_encoders[0]).items()})
        tensors.update(hf_to_open_clip(text_encoders[1]))
    else:
        raise CheckpointError(f"only SD1.5/SDXL models have a single-file layout, not {family!r}")
    if vae is not None:
        vae_state = vae.state_dict()
        for key, ldm in layout.vae_key_map(dict(vae.config), vae_state.keys()).items():
            value = vae_state[key]
            if ".mid.attn_1." in ldm and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
            tensors[layout.VAE_PREFIX + ldm] = value
    if prediction_type == "v_prediction":
        tensors["v_pred"] = torch.zeros(0)
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in tensors.items()}
    return atomic_write(path, lambda staging: save_file(tensors, staging, metadata=metadata), overwrite=overwrite)
