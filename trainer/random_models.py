"""Random-weight SD1.5 / SDXL parts, built from config with the real diffusers / transformers classes.

The one home of the architectures that every random-weight model in the package is made from: the full-size
SD1.5 and SDXL UNets, CLIP-L, OpenCLIP-G (bigG) and the SD VAE, each written once, and the ways callers
shrink them (a width divisor, fewer transformer or text layers, the tiny plumbing models). Random weights
cost and fit exactly as trained ones do, so the benchmarks measure real sizes without a download.

Pure construction: nothing is read, written or downloaded here. `device="meta"` builds a skeleton without
allocating weights; `dtype` builds directly in that dtype (no float32 copy ever exists). Users:
tiny_models.py (the `builtin:tiny-*` teachers), research/cost.py, benchmarks/gpu_check.py and checkpoint_io.py,
tests/comfyui/tiny_checkpoints.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

FAMILIES = ("sd15", "sdxl")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14, SDXL's second encoder
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2)
VAE_SCALING_FACTORS = {"sd15": 0.18215, "sdxl": 0.13025}
TEXT_ENCODERS = {"sd15": (CLIP_L,), "sdxl": (CLIP_L, CLIP_G)}
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}

# CLIP's own tokenizer's special tokens (transformers' CLIPTextConfig defaults), and those of
# tiny_models.write_tiny_clip_tokenizer (<|startoftext|> 0, <|endoftext|> 1)
CLIP_SPECIAL_TOKENS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
TINY_TOKENIZER_SPECIAL_TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)

# The tiny plumbing models (tiny_models.py): 32-channel text encoders of two layers whose head count and
# activation follow the real encoders' rules (64-channel heads, at least one; OpenCLIP uses gelu), as a
# single-file loader has to assume them; a two-level UNet (SD1.x: 8 heads; SDXL: 64 channels per head, at
# least one) with GroupNorm(32) as every SD UNet; a two-level VAE.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
_TINY_CLIP_L = dict(CLIP_L, **_TINY_TEXT, projection_dim=32)
TINY_TEXT_ENCODERS = {"sd15": (_TINY_CLIP_L,), "sdxl": (_TINY_CLIP_L, dict(CLIP_G, **_TINY_TEXT, projection_dim=16))}
_TINY_SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8,
)
TINY_UNETS = {"sd15": _TINY_SD15_UNET,
              # context: the two encoders' hidden states concatenated; ADM input: 6 time ids x 8 + G's projection
              "sdxl": dict(_TINY_SD15_UNET, cross_attention_dim=64, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                           transformer_layers_per_block=(1, 2), use_linear_projection=True, attention_head_dim=(1, 1))}
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")


def unet_config(family: str, tiny: bool = False, width_divisor: int = 1, transformer_layers: tuple | None = None,
                **overrides) -> dict:
    """The UNet2DConditionModel config of `family` (full size, or the tiny plumbing UNet with `tiny`).

    width_divisor: channels, head widths (at least 1) and GroupNorm groups divided by it (4: quarter width);
    transformer_layers: the transformer depth per level instead of the family's; overrides: any config key.
    """
    _check_family(family)
    config = dict((TINY_UNETS if tiny else UNETS)[family])
    if width_divisor > 1:
        heads = config["attention_head_dim"]
        config.update(block_out_channels=tuple(c // width_divisor for c in config["block_out_channels"]),
                      attention_head_dim=(tuple(max(1, h // width_divisor) for h in heads)
                                          if isinstance(heads, tuple) else max(1, heads // width_divisor)),
                      norm_num_groups=32 // width_divisor)
    if transformer_layers is not None:
        config["transformer_layers_per_block"] = tuple(transformer_layers)
    config.update(overrides)
    return config


def text_encoder_configs(family: str, tiny: bool = False, layers: int | None = None, mlp_ratio: int | None = None,
                         vocab_size: int = 49408, max_length: int = 77, special_tokens: dict | None = None,
                         **overrides) -> list[dict]:
    """The CLIPTextConfig keywords of `family`'s text encoders: [CLIP-L] (SD1.5) or [CLIP-L, OpenCLIP-G] (SDXL).

    tiny: the tiny plumbing encoders; layers: fewer (or more) transformer layers; mlp_ratio: MLP width as a
    multiple of the hidden width; special_tokens: the tokenizer's ids (default CLIP's own; a tiny tokenizer
    needs TINY_TOKENIZER_SPECIAL_TOKENS); overrides: any key, for every encoder.
    """
    _check_family(family)
    configs = []
    for base in (TINY_TEXT_ENCODERS if tiny else TEXT_ENCODERS)[family]:
        config = dict(base, vocab_size=vocab_size, max_position_embeddings=max_length,
                      **(special_tokens or CLIP_SPECIAL_TOKENS))
        if layers is not None:
            config["num_hidden_layers"] = layers
        if mlp_ratio is not None:
            config["intermediate_size"] = config["hidden_size"] * mlp_ratio
        config.update(overrides)
        configs.append(config)
    return configs


def vae_config(family: str, tiny: bool = False, **overrides) -> dict:
    """The AutoencoderKL config of the SD VAE (or the tiny two-level one) with `family`'s latent scaling factor."""
    _check_family(family)
    return dict(TINY_VAE if tiny else SD_VAE, scaling_factor=VAE_SCALING_FACTORS[family], **overrides)


@contextlib.contextmanager
def _building(device, dtype):
    """Modules constructed inside are created on `device` in `dtype` (None: torch's current defaults)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def build_unet(config: dict, device=None, dtype: torch.dtype | None = None):
    """A UNet2DConditionModel with random weights from `config` (train mode, as the constructor leaves it)."""
    from diffusers import UNet2DConditionModel

    with _building(device, dtype):
        return UNet2DConditionModel(**config)


def build_text_encoders(configs: list[dict], device=None, dtype: torch.dtype | None = None) -> list:
    """Random-weight text encoders: the first a CLIPTextModel (CLIP-L), a second with its projection (SDXL's G)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = (CLIPTextModel, CLIPTextModelWithProjection)
    if len(configs) > len(classes):
        raise ValueError(f"at most {len(classes)} text encoders (CLIP-L, OpenCLIP-G), got {len(configs)}")
    with _building(device, dtype):
        return [cls(CLIPTextConfig(**config)) for cls, config in zip(classes, configs)]


def build_vae(config: dict, device=None, dtype: torch.dtype | None = None):
    """An AutoencoderKL with random weights from `config`."""
    from diffusers import AutoencoderKL

    with _building(device, dtype):
        return AutoencoderKL(**config)


@dataclass
class Parts:
    """A random-weight model's parts: the UNet, its text encoders (CLIP-L, then SDXL's OpenCLIP-G), the VAE."""

    unet: Any
    text_encoders: list
    vae: Any = None


def build_parts(unet: dict, text_encoders: list[dict], vae: dict | None = None, device=None,
                dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                seed: int | None = None) -> Parts:
    """Frozen parts (eval mode, no gradients) from configs, built on `device`: text encoders, UNet, then VAE.

    dtype: of the UNet and the text encoders, vae_dtype: of the VAE (None: torch's default dtype); seed:
    torch.manual_seed before the first part, so the same seed gives the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    encoders = build_text_encoders(text_encoders, device, dtype)
    network = build_unet(unet, device, dtype)
    autoencoder = build_vae(vae, device, vae_dtype) if vae is not None else None
    for module in (*encoders, network, autoencoder):
        if module is not None:
            module.eval().requires_grad_(False)
    return Parts(network, encoders, autoencoder)
