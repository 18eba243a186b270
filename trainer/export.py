"""The student as files: a kohya LoRA or a full UNet with its metadata, and the all-in-one checkpoint."""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import (
    kohya_lora_state_dict,
    lora_module_names,
    student_metadata,
    write_ldm_checkpoint,
    write_merged_checkpoint,
)
from .networks import LoraRoles

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def student_tensors(trainer) -> tuple[str, dict[str, Tensor]]:
    """(format, tensors): a kohya LoRA (`lora_unet_<ldm path>`) or a full UNet in LDM names, where the
    backbone has an LDM layout; diffusers/peft names otherwise."""
    from .ldm_layout import UNET_PREFIX

    dtype = SAVE_DTYPES[trainer.config.save_precision]
    ldm_keys = trainer.adapter.unet_ldm_keys
    if isinstance(trainer.roles, LoraRoles):
        peft_state = trainer.roles.peft_state_dict("student")
        if ldm_keys is None:
            return "lora", {f"unet.{k}": v.to(dtype) for k, v in peft_state.items()}
        return "lora", kohya_lora_state_dict(peft_state, lora_module_names(ldm_keys), trainer.config.network_alpha, dtype)
    state = trainer.roles.merged_state_dict("student")
    if ldm_keys is None:
        return "unet", {k: v.to(dtype) for k, v in state.items()}
    return "unet", {UNET_PREFIX + ldm_keys[k]: v.to(dtype) for k, v in state.items()}


def base_identity(trainer) -> dict[str, str]:
    """The adapter's identity of the base (name, sha256), hashed once per run."""
    if trainer._base is None:
        trainer._base = trainer.adapter.identity()
    return trainer._base


def save_merged_checkpoint(trainer) -> str:
    """The all-in-one checkpoint: the teacher's own file (or an LDM export of its diffusers parts) with the
    student merged into the UNet."""
    adapter, config = trainer.adapter, trainer.config
    metadata = student_metadata(config, trainer.step, adapter, trainer.guidance_scale, kind="checkpoint",
                                base=base_identity(trainer))
    path = trainer.output_paths["checkpoint"]
    if adapter.source_checkpoint:
        if isinstance(trainer.roles, LoraRoles):
            return write_merged_checkpoint(adapter.source_checkpoint, path, adapter.unet_ldm_keys, metadata,
                                           adapter.prediction_type, deltas=trainer.roles.lazy_delta_weights("student"),
                                           overwrite=True)
        return write_merged_checkpoint(adapter.source_checkpoint, path, adapter.unet_ldm_keys, metadata,
                                       adapter.prediction_type, unet_state=trainer.roles.merged_state_dict("student"),
                                       overwrite=True)
    return write_ldm_checkpoint(path, adapter, metadata, overwrite=True, dtype=SAVE_DTYPES[config.save_precision],
                                unet_state=trainer.roles.merged_state_dict("student"))
