"""The student as files: a kohya LoRA or a full UNet with its metadata, and the all-in-one checkpoint."""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import (
    kohya_lora_state_dict,
    write_ldm_checkpoint,
    write_merged_checkpoint,
)
from .networks import LoraRoles

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def student_tensors(roles, ldm_keys: dict[str, str] | None, kohya_names: dict[str, str] | None, network_alpha: float,
                    dtype: torch.dtype) -> tuple[str, dict[str, Tensor]]:
    """(format, tensors) of the student role in `roles`: a kohya LoRA (`lora_unet_<path>`, in `kohya_names`: the
    paths kohya's trainer uses for the family) or a full UNet in LDM names, where the backbone has an LDM layout
    (`ldm_keys`: backbone name -> LDM name); diffusers/peft names otherwise."""
    from .ldm_layout import UNET_PREFIX

    if isinstance(roles, LoraRoles):
        peft_state = roles.peft_state_dict("student")
        if kohya_names is None:
            return "lora", {f"unet.{k}": v.to(dtype) for k, v in peft_state.items()}
        return "lora", kohya_lora_state_dict(peft_state, kohya_names, network_alpha, dtype)
    state = roles.merged_state_dict("student")
    if ldm_keys is None:
        return "unet", {k: v.to(dtype) for k, v in state.items()}
    return "unet", {UNET_PREFIX + ldm_keys[k]: v.to(dtype) for k, v in state.items()}


def save_merged_checkpoint(adapter, roles, path: str, metadata: dict[str, str], dtype: torch.dtype) -> str:
    """The all-in-one checkpoint at `path`: the teacher's own file (or an LDM export of its diffusers parts) with
    the student role of `roles` merged into the UNet."""
    if adapter.source_checkpoint:
        if isinstance(roles, LoraRoles):
            return write_merged_checkpoint(adapter.source_checkpoint, path, adapter.unet_ldm_keys, metadata,
                                           adapter.prediction_type, deltas=roles.lazy_delta_weights("student"),
                                           overwrite=True)
        return write_merged_checkpoint(adapter.source_checkpoint, path, adapter.unet_ldm_keys, metadata,
                                       adapter.prediction_type, unet_state=roles.merged_state_dict("student"),
                                       overwrite=True)
    return write_ldm_checkpoint(path, family=adapter.family, unet=adapter.network, text_encoders=adapter.text_encoders,
                                vae=adapter.vae, prediction_type=adapter.prediction_type, metadata=metadata,
                                overwrite=True, dtype=dtype, unet_state=roles.merged_state_dict("student"))
