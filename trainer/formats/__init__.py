"""Every file format the product reads or writes, one module per format:

- `safetensors_io`: the container: checked headers (pickles refused, truncation found before loading), streamed
  writing, atomic saves, a file's sha256; `CheckpointError`, the error of every format here;
- `single_file`: single-file (LDM layout) SD1.5 / SDXL checkpoints: detection from the header alone, the text
  encoders' key layouts, the all-in-one checkpoint (the user's own file with only the UNet tensors replaced, every
  other tensor copied byte for byte, streamed) and an LDM export of diffusers-built parts;
- `lora`: LoRA keys both ways: the kohya layout (`lora_unet_*`) and its peft twin, and the LoRA files a creator
  has (kohya, diffusers / peft, ComfyUI) read as the student's warm start;
- `metadata`: the metadata schema of every student file (`modelspec.*`, `decoupled_dmd.*`, kohya's `ss_*`),
  written and read.

The names below are re-exported, so `from .formats import X` works for any of them. Building models from a single
file is the adapters' job (`adapters/single_file.py`).
"""

from ..errors import ConfigError
from .lora import (
    LORA_PARTS,
    TEXT_ENCODER_PREFIXES,
    InitLora,
    is_kohya_lora,
    kohya_lora_state_dict,
    kohya_module_names,
    lora_aliases,
    lora_module_names,
    peft_from_kohya,
    read_init_lora,
)
from .metadata import (
    KOHYA_BASE_VERSION,
    METHOD,
    MODELSPEC_ARCHITECTURE,
    PATH_KEYS,
    checkpoint_metadata,
    comfyui_sampler_settings,
    read_student_metadata,
    shareable_config,
    student_format,
    student_metadata,
    student_timesteps,
)
from .safetensors_io import (
    DTYPE_BYTES,
    PICKLE_MAGIC,
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    CheckpointError,
    atomic_save_safetensors,
    file_sha256,
    header_problem,
    read_safetensors_header,
    refuse_pickle,
    tensor_shapes,
    write_safetensors_stream,
)
from .single_file import (
    CheckpointInfo,
    canonical_clip_state,
    clip_l_state,
    hf_to_open_clip,
    inspect_checkpoint,
    open_clip_to_hf,
    write_ldm_checkpoint,
    write_merged_checkpoint,
)

__all__ = [
    # safetensors_io
    "CheckpointError", "DTYPE_BYTES", "PICKLE_MAGIC", "PICKLE_SUFFIXES", "SAFETENSORS_DTYPES",
    "atomic_save_safetensors", "file_sha256", "header_problem", "read_safetensors_header", "refuse_pickle",
    "tensor_shapes", "write_safetensors_stream",
    # single_file
    "CheckpointInfo", "canonical_clip_state", "clip_l_state", "hf_to_open_clip", "inspect_checkpoint",
    "open_clip_to_hf", "write_ldm_checkpoint", "write_merged_checkpoint",
    # lora
    "LORA_PARTS", "TEXT_ENCODER_PREFIXES", "InitLora", "is_kohya_lora", "kohya_lora_state_dict", "kohya_module_names",
    "lora_aliases",
    "lora_module_names", "peft_from_kohya", "read_init_lora",
    # metadata
    "KOHYA_BASE_VERSION", "METHOD", "MODELSPEC_ARCHITECTURE", "PATH_KEYS", "checkpoint_metadata",
    "comfyui_sampler_settings", "read_student_metadata", "shareable_config", "student_format", "student_metadata",
    "student_timesteps",
    # the base of CheckpointError (trainer/errors.py)
    "ConfigError",
]
