"""Every file format the product reads or writes, in one place.

- safetensors: checked headers (pickles refused, truncation found before loading), streamed writing, atomic saves;
- single-file (LDM layout) SD1.5 / SDXL checkpoints: detection from the header alone, CLIP key layouts;
- LoRA in the kohya layout (`lora_unet_*`) and its peft twin;
- the all-in-one checkpoint: the user's own file with only the UNet tensors replaced, every other tensor copied
  byte for byte, streamed, so a multi-GB checkpoint never sits in memory twice;
- the metadata schema of every student file (`modelspec.*`, `decoupled_dmd.*`, kohya's `ss_*`), written and
  read here.

Building models from a single file is the adapters' job (`adapters/single_file.py`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ldm_layout as layout
from .config import ConfigError
from .outputs import atomic_write

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_MAGIC = (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip, raw pickle
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used, with what to do instead."""


# --- reading headers ------------------------------------------------------------------------------------------
def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, checked against the file's size."""
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        try:
            if length > min(size - 8, 100_000_000):
                raise ValueError("header length beyond the file")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError):
            if prefix[:2] in PICKLE_MAGIC:
                raise CheckpointError(f"{path!r} holds a pickle (a .ckpt/.pt file renamed?); only safetensors are "
                                      "read, because loading a pickle can run code. Convert it to "
                                      ".safetensors") from None
            raise CheckpointError(f"{path!r} is not a safetensors file (or its header is damaged)") from None
    data_start = 8 + length
    problem = header_problem(header)
    if problem:
        raise CheckpointError(f"{path!r} has a damaged safetensors header ({problem}); download or copy it again")
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path!r} is truncated: the header describes {data_start + end} bytes but the file "
                              f"has {size}; download or copy it again")
    return header, data_start


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def header_problem(header: dict) -> str | None:
    """What is wrong with a parsed safetensors header (entries, dtypes, shapes, offsets, metadata), or None."""
    metadata = header.get("__metadata__")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        return "__metadata__ is not a table of strings"
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            return f"{name}: no known dtype"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"{name}: shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"{name}: data_offsets {offsets!r}"
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[entry["dtype"]]:
            return f"{name}: {offsets[1] - offsets[0]} bytes for a {entry['dtype']} tensor of shape {shape}"
    return None


def refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path!r} is a pickled checkpoint; loading one can run arbitrary code, so only "
                              ".safetensors files are read. Convert it to .safetensors (or download that version)")


def tensor_shapes(header: dict) -> dict[str, tuple]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


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


# --- LoRA in the kohya layout ---------------------------------------------------------------------------------
def kohya_lora_state_dict(peft_state: dict[str, Tensor], ldm_modules: dict[str, str], alpha: float,
                          dtype=None) -> dict[str, Tensor]:
    """peft `<module>.lora_A/B.weight` -> kohya `lora_unet_<ldm_path>.lora_down/lora_up.weight` + `.alpha`.

    The scale is alpha / rank in both conventions, so the weights carry over unchanged.
    """
    out = {}
    for key, value in peft_state.items():
        module, part = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", key).groups()
        name = "lora_unet_" + ldm_modules[module].replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value.to(dtype) if dtype else value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out


def peft_from_kohya(tensors: dict[str, Tensor], ldm_modules: dict[str, str]) -> tuple[dict[str, Tensor], int, float]:
    """The inverse of `kohya_lora_state_dict`: (peft state dict, rank, alpha)."""
    by_kohya = {"lora_unet_" + ldm.replace(".", "_"): module for module, ldm in ldm_modules.items()}
    state, ranks, alphas = {}, set(), set()
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if name not in by_kohya:
            raise CheckpointError(f"LoRA key {key!r} names no layer of this UNet; was it trained for another model?")
        if part == "alpha":
            alphas.add(float(value))
        elif part in ("lora_down.weight", "lora_up.weight"):
            state[f"{by_kohya[name]}.{'lora_A' if part == 'lora_down.weight' else 'lora_B'}.weight"] = value.float()
            if part == "lora_down.weight":
                ranks.add(value.shape[0])
        else:
            raise CheckpointError(f"LoRA key {key!r}: expected .lora_down.weight, .lora_up.weight or .alpha")
    if len(ranks) != 1 or len(alphas) > 1:
        raise CheckpointError(f"LoRA mixes ranks {sorted(ranks)} / alphas {sorted(alphas)}; expected one of each")
    rank = ranks.pop()
    return state, rank, alphas.pop() if alphas else float(rank)


def is_kohya_lora(keys) -> bool:
    return any(k.startswith("lora_unet_") for k in keys)



def lora_module_names(unet_ldm_keys: dict[str, str]) -> dict[str, str]:
    """{diffusers module: LDM module} from a {diffusers weight: LDM weight} key map (the modules LoRA adapts)."""
    return {k[: -len(".weight")]: v[: -len(".weight")] for k, v in unet_ldm_keys.items() if k.endswith(".weight")}


# --- writing --------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors_stream(path: str, entries: list[tuple[str, str, list[int], object]], metadata: dict[str, str]):
    """Write safetensors from (name, dtype name, shape, source) entries, one tensor in memory at a time.

    source: bytes; (file, offset, length) to copy unchanged bytes in chunks (byte-identical); or
    (make, length), a zero-argument callable that returns the tensor when its turn comes.
    """
    header, offset = {}, 0
    for name, dtype, shape, source in entries:
        length = len(source) if isinstance(source, bytes) else source[-1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, dtype, _, source in entries:
            if isinstance(source, bytes):
                out.write(source)
            elif len(source) == 2:
                data = _tensor_bytes(source[0]().to(SAFETENSORS_DTYPES[dtype]))
                if len(data) != source[1]:
                    raise CheckpointError(f"{name}: produced {len(data)} bytes, expected {source[1]}")
                out.write(data)
            else:
                _copy_range(source, out)


def _copy_range(source: tuple[str, int, int], out) -> None:
    file, start, length = source
    with open(file, "rb") as handle:
        handle.seek(start)
        while length:
            chunk = handle.read(min(length, 64 << 20))
            if not chunk:
                raise CheckpointError(f"{file!r} ended early while copying; is it being modified?")
            out.write(chunk)
            length -= len(chunk)


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


def write_ldm_checkpoint(path: str, adapter, metadata: dict[str, str] | None = None, overwrite: bool = False,
                         unet_state: dict[str, Tensor] | None = None, dtype=None) -> str:
    """A diffusers-built SD1.5/SDXL model (a `DiffusersAdapter`) as one LDM-layout safetensors file."""
    from safetensors.torch import save_file

    unet = adapter.network
    unet_state = unet_state if unet_state is not None else unet.state_dict()
    keys = layout.unet_key_map(dict(unet.config), unet_state.keys())
    tensors = {layout.UNET_PREFIX + keys[k]: v for k, v in unet_state.items()}
    if adapter.family == "sd15":
        tensors.update({layout.SD15_CLIP_PREFIX + k: v
                        for k, v in canonical_clip_state(adapter.text_encoders[0]).items()})
    elif adapter.family == "sdxl":
        tensors.update({layout.SDXL_CLIP_L_PREFIX + k: v
                        for k, v in canonical_clip_state(adapter.text_encoders[0]).items()})
        tensors.update(hf_to_open_clip(adapter.text_encoders[1]))
    else:
        raise CheckpointError(f"only SD1.5/SDXL models have a single-file layout, not {adapter.family!r}")
    if adapter.vae is not None:
        vae_state = adapter.vae.state_dict()
        for key, ldm in layout.vae_key_map(dict(adapter.vae.config), vae_state.keys()).items():
            value = vae_state[key]
            if ".mid.attn_1." in ldm and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
            tensors[layout.VAE_PREFIX + ldm] = value
    if adapter.prediction_type == "v_prediction":
        tensors["v_pred"] = torch.zeros(0)
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in tensors.items()}
    return atomic_write(path, lambda staging: save_file(tensors, staging, metadata=metadata), overwrite=overwrite)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None,
                            overwrite: bool = True) -> str:
    """Save tensors with `atomic_write`; returns the path written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda staging: save_file(tensors, staging, metadata=metadata), overwrite=overwrite)


# --- identity and metadata ------------------------------------------------------------------------------------
_HASHES: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file (cached per path, size and mtime: a base checkpoint is hashed once per process)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(16 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def comfyui_sampler_settings(steps: int) -> dict:
    """What a stock KSampler needs to sample the student (the Few-Step Sampler reads the exact timesteps)."""
    return {"sampler_name": "lcm", "scheduler": "sgm_uniform", "cfg": 1.0, "steps": steps}


# --- the metadata schema of student files ----------------------------------------------------------------------
METHOD = "decoupled-dmd"


def student_metadata(config, step: int, adapter, guidance_scale: float, kind: str = "lora",
                     base: dict[str, str] | None = None) -> dict[str, str]:
    """Header of every student file (safetensors metadata is str -> str).

    kind: lora | unet | checkpoint. Holds what a loader needs to sample the student as trained (steps, exact
    timesteps, the stock ComfyUI sampler settings), where it came from (base file and hash) and the full config.
    """
    steps = len(config.student_timesteps)
    family = adapter.family
    architecture = MODELSPEC_ARCHITECTURE.get(family, f"decoupled-dmd-{family}")
    height, width = config.resolution_hw() or adapter.default_resolution
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + ("/lora" if kind == "lora" else ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{config.output_name} ({steps}-step Decoupled DMD)",
        "modelspec.description": f"{steps}-step student distilled with Decoupled DMD; sample at cfg 1 with the "
                                 f"timesteps in decoupled_dmd.student_timesteps (ComfyUI: lcm + sgm_uniform)",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "rectified-flow"}.get(adapter.prediction_type,
                                                                                         adapter.prediction_type),
        "decoupled_dmd.method": METHOD,
        "decoupled_dmd.format": kind,
        "decoupled_dmd.family": family,
        "decoupled_dmd.prediction_type": adapter.prediction_type,
        "decoupled_dmd.training_mode": config.training_mode,
        "decoupled_dmd.steps": str(steps),
        "decoupled_dmd.student_timesteps": json.dumps([int(t) for t in config.student_timesteps]),
        "decoupled_dmd.comfyui_sampler": json.dumps(comfyui_sampler_settings(steps)),
        "decoupled_dmd.train_steps": str(step),
        "decoupled_dmd.guidance_scale": str(guidance_scale),
        "decoupled_dmd.renoise_schedule": config.renoise_schedule,
        "decoupled_dmd.network_dim": str(config.network_dim),
        "decoupled_dmd.network_alpha": str(config.network_alpha),
        "decoupled_dmd.lora_target_modules": json.dumps(
            config.lora_target_modules or adapter.default_lora_target_modules()),
        "decoupled_dmd.config": shareable_config(config).to_toml(),
    }
    for name, value in (base or {}).items():
        metadata[f"decoupled_dmd.base_{name}"] = value
    if config.network_weights:  # the warm start: which LoRA the student began as
        metadata["decoupled_dmd.network_weights"] = os.path.basename(config.network_weights)
        metadata["decoupled_dmd.network_weights_sha256"] = file_sha256(config.network_weights)
    if kind == "lora":  # read by kohya tools and A1111/Forge's LoRA info panel
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(config.network_dim),
                         "ss_network_alpha": str(config.network_alpha),
                         "ss_base_model_version": KOHYA_BASE_VERSION.get(family, family),
                         "ss_v2": "False", "ss_output_name": config.output_name})
    return metadata


PATH_KEYS = ("pretrained_model_name_or_path", "tokenizer_path", "output_dir", "logging_dir", "prompt_file", "resume",
             "sample_prompts", "network_weights")


def shareable_config(config):
    """The config with local paths cut to their last component: a creator who shares a student shares no folder
    names (a Hugging Face id or builtin: name stays as it is)."""
    changes = {}
    for key in PATH_KEYS:
        value = getattr(config, key)
        if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)
                                                 or value.startswith((".", "~")) or "\\" in value):
            changes[key] = os.path.basename(os.path.normpath(value))
    return config.replace(**changes) if changes else config


def checkpoint_metadata(lora_metadata: dict[str, str]) -> dict[str, str]:
    """A LoRA's header, restated for an all-in-one checkpoint that holds it merged."""
    metadata = {k: v for k, v in lora_metadata.items() if not k.startswith("ss_")}
    metadata["decoupled_dmd.format"] = "checkpoint"
    if metadata.get("modelspec.architecture", "").endswith("/lora"):
        metadata["modelspec.architecture"] = metadata["modelspec.architecture"][: -len("/lora")]
    return metadata


def read_student_metadata(path: str) -> dict[str, str]:
    """The header of a student file (LoRA, UNet or all-in-one checkpoint); refuses files without one."""
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("decoupled_dmd.method") != METHOD:
        raise ConfigError(f"{path!r} is not a Decoupled DMD student (no decoupled_dmd metadata)")
    return metadata


def student_format(metadata: dict[str, str]) -> str:
    """lora | unet | checkpoint (files from before `decoupled_dmd.format` existed: from the training mode)."""
    kind = metadata.get("decoupled_dmd.format") or \
        ("lora" if metadata.get("decoupled_dmd.training_mode", "lora") == "lora" else "unet")
    if kind not in ("lora", "unet", "checkpoint"):
        raise ConfigError(f"decoupled_dmd.format {kind!r} is not lora, unet or checkpoint; the metadata is damaged")
    return kind


def student_timesteps(metadata: dict[str, str]) -> list[int]:
    """The timesteps the student was trained on (sample with exactly these); ConfigError if missing or garbled."""
    from .schedules import parse_student_timesteps

    key = "decoupled_dmd.student_timesteps"
    try:
        return parse_student_timesteps(json.loads(metadata[key]), key)
    except KeyError:
        raise ConfigError(f"the file's metadata has no {key}; give the timesteps yourself") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the file's {key} is unusable ({error}); give the timesteps yourself") from None


# --- LoRA files a creator has (the student's warm start) -------------------------------------------------------
LORA_PARTS = {  # key suffix -> (A or B): every plain-LoRA layout in use
    "lora_down.weight": "A", "lora_up.weight": "B", "lora_A.weight": "A", "lora_B.weight": "B",
    "lora.down.weight": "A", "lora.up.weight": "B", "lora_A.default.weight": "A", "lora_B.default.weight": "B",
}
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "lora_te1", "lora_te2", "clip_")


def lora_aliases(network_module: str, diffusers_module: str | None, ldm_module: str | None) -> dict[str, str]:
    """Every name a LoRA file may give one UNet module, -> the network's own module name: kohya (`lora_unet_`
    with LDM or diffusers paths), ComfyUI (`diffusion_model.` + LDM path), diffusers / peft (`unet.` + path, old
    attention-processor names)."""
    names = {network_module}
    if ldm_module:
        names |= {"lora_unet_" + ldm_module.replace(".", "_"), "diffusion_model." + ldm_module, ldm_module}
    if diffusers_module:
        old = diffusers_module.replace(".to_", ".processor.to_").removesuffix(".0") \
            if ".to_" in diffusers_module else diffusers_module
        names |= {"lora_unet_" + diffusers_module.replace(".", "_"), "unet." + diffusers_module, diffusers_module,
                  "unet." + old, old, "base_model.model." + diffusers_module}
    return {name: network_module for name in names}


@dataclass
class InitLora:
    """A LoRA file as the student's starting point: {network module: (A, B)} at one rank, with every module's
    own scale folded into B so that (network_alpha / rank) * B @ A is the file's delta exactly."""

    name: str
    sha256: str
    rank: int
    weights: dict[str, tuple[Tensor, Tensor]]


def read_init_lora(path: str, aliases: dict[str, str], network_alpha: float, family: str | None = None) -> InitLora:
    """Read a kohya, diffusers/peft or ComfyUI LoRA for the student. Modules of different ranks are padded with
    zeros to the largest (B @ A is unchanged); keys that name no layer are an error that lists them."""
    from safetensors import safe_open

    header, _ = read_safetensors_header(path)
    name = os.path.basename(path)
    metadata = header.get("__metadata__") or {}
    other = _other_family(metadata, family)
    if other:
        raise CheckpointError(f"network_weights: {name} is a LoRA for {other}, the teacher is {family}; give a "
                              f"LoRA made for {family}")
    groups: dict[str, dict[str, str]] = {}
    unknown, text_encoder = [], []
    for key in (k for k in header if k != "__metadata__"):
        part = next((p for p in LORA_PARTS if key.endswith("." + p)), None)
        prefix = key[: -len(part) - 1] if part else key.rsplit(".", 1)[0]
        kind = LORA_PARTS.get(part) if part else ("alpha" if key.endswith(".alpha") else None)
        if kind is None:
            if key.endswith((".dora_scale", ".hada_w1_a", ".lokr_w1", ".diff", ".diff_b", ".bias", ".w_norm")):
                raise CheckpointError(f"network_weights: {name} holds {key!r}: only plain LoRA (down/up, A/B) "
                                      "files can start the student; LyCORIS, DoRA and full-weight diffs cannot")
            unknown.append(key)
            continue
        if prefix.startswith(TEXT_ENCODER_PREFIXES):
            text_encoder.append(key)
            continue
        if prefix not in aliases:
            unknown.append(key)
            continue
        groups.setdefault(aliases[prefix], {})[kind] = key
    if text_encoder:
        raise CheckpointError(f"network_weights: {name} also adapts the text encoders ({text_encoder[0]!r}, "
                              f"{len(text_encoder)} keys); the student trains the UNet only: apply this LoRA to the "
                              "teacher instead (a LoraLoader before Load Teacher), or use a UNet-only LoRA")
    if unknown:
        raise CheckpointError(f"network_weights: {len(unknown)} keys of {name} name no layer of this model, e.g. "
                              f"{', '.join(map(repr, unknown[:4]))}; is it a LoRA for another model?")
    incomplete = [module for module, parts in groups.items() if set(parts) & {"A", "B"} != {"A", "B"}]
    if incomplete or not groups:
        raise CheckpointError(f"network_weights: {name} has no complete down/up pair for "
                              f"{incomplete[:3] or 'any layer'}")
    loaded: dict[str, tuple[Tensor, Tensor, float]] = {}
    with safe_open(path, framework="pt") as handle:
        for module, parts in groups.items():
            down, up = handle.get_tensor(parts["A"]).float(), handle.get_tensor(parts["B"]).float()
            rank = down.shape[0]
            if up.shape[1] != rank:
                raise CheckpointError(f"network_weights: {name}: {module} has down rank {rank}, up rank {up.shape[1]}")
            alpha = float(handle.get_tensor(parts["alpha"]).float().item()) if "alpha" in parts else float(rank)
            loaded[module] = (down, up, alpha)
    rank = max(down.shape[0] for down, _, _ in loaded.values())
    weights = {}
    for module, (down, up, alpha) in loaded.items():
        scale = (alpha / down.shape[0]) / (network_alpha / rank)
        pad = rank - down.shape[0]
        down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])]) if pad else down
        up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1) if pad else up
        weights[module] = (down.contiguous(), (up * scale).contiguous())
    return InitLora(name, file_sha256(path), rank, weights)


def _other_family(metadata: dict[str, str], family: str | None) -> str | None:
    """The family a LoRA's own metadata names, where it contradicts `family`."""
    text = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture",
                                                  "decoupled_dmd.family")).lower()
    said = "sdxl" if ("sdxl" in text or "stable-diffusion-xl" in text) else \
        "sd15" if ("sd_v1" in text or "stable-diffusion-v1" in text or "sd15" in text) else None
    return said if said and family and said != family else None
