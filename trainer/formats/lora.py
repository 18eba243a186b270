"""LoRA keys both ways: the student written in the kohya layout (`lora_unet_<path>`, in the paths kohya's own trainer
uses for the family) and read back, and the LoRA files a creator already has (kohya, diffusers / peft, ComfyUI
layouts) read as the student's warm start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .safetensors_io import CheckpointError, file_sha256, read_safetensors_header


# --- LoRA in the kohya layout ---------------------------------------------------------------------------------
def kohya_module_names(family: str, ldm_modules: dict[str, str], diffusers_modules: dict[str, str]) -> dict[str, str]:
    """{network module: the path kohya's own trainer names it by}: SDXL LoRAs in LDM paths
    (`lora_unet_input_blocks_4_1_proj_in`: kohya trains SDXL on the sgm UNet), SD1.x/2.x LoRAs in diffusers paths
    (`lora_unet_down_blocks_0_attentions_0_proj_in`: kohya trains them on a diffusers-layout UNet). ComfyUI and
    A1111/Forge read both; diffusers' `load_lora_weights` reads an SD1.5 file only in diffusers paths."""
    return dict(ldm_modules) if family == "sdxl" else dict(diffusers_modules)


def kohya_lora_state_dict(peft_state: dict[str, Tensor], kohya_modules: dict[str, str], alpha: float,
                          dtype=None) -> dict[str, Tensor]:
    """peft `<module>.lora_A/B.weight` -> kohya `lora_unet_<path>.lora_down/lora_up.weight` + `.alpha`, the path
    from `kohya_modules` (see `kohya_module_names`).

    The scale is alpha / rank in both conventions, so the weights carry over unchanged.
    """
    out = {}
    for key, value in peft_state.items():
        module, part = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", key).groups()
        name = "lora_unet_" + kohya_modules[module].replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value.to(dtype) if dtype else value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out


def peft_from_kohya(tensors: dict[str, Tensor], *module_paths: dict[str, str]) -> tuple[dict[str, Tensor], int, float]:
    """The inverse of `kohya_lora_state_dict`: (peft state dict, rank, alpha). Each of `module_paths` is a
    {network module: path} naming the kohya keys may use (LDM paths, diffusers paths): students written before
    SD1.5 files took kohya's diffusers paths still read."""
    by_kohya = {"lora_unet_" + path.replace(".", "_"): module for paths in module_paths
                for module, path in paths.items()}
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
        slot = LORA_PARTS.get(part) if part else ("alpha" if key.endswith(".alpha") else None)
        if slot is None:
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
        groups.setdefault(aliases[prefix], {})[slot] = key
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
