"""The original (LDM / "single-file") key layout of SD1.5 and SDXL checkpoints, and its diffusers equivalents.

Pure key and config arithmetic: no file access, no model construction. `unet_key_map` maps every diffusers
UNet2DConditionModel weight name to its LDM name (`input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`);
`unet_config_from_ldm` derives the diffusers UNet config from the LDM tensors' names and shapes alone, the way
ComfyUI detects a model, so distilled layouts (SSD-1B, Vega) and small test checkpoints load as well as the
reference shapes. The text encoder and VAE maps are used to write single-file checkpoints.
"""

from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D submodule -> LDM ResBlock submodule
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# SD attention head rules (not recoverable from tensor shapes): SD1.x uses 8 heads, SDXL 64 channels a head.
SD15_NUM_HEADS = 8
SDXL_HEAD_CHANNELS = 64
CLIP_HEAD_CHANNELS = 64


def _per_block(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def unet_module_map(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(exact, prefix) module maps diffusers -> LDM for a UNet2DConditionModel config.

    exact: whole modules (resnet parts, convs, embeddings); prefix: transformer blocks, whose inner names
    (`transformer_blocks.0.attn1.to_q`, `proj_in`, `norm`) are the same in both layouts.
    """
    exact: dict[str, str] = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    if config.get("addition_embed_type") == "text_time":
        exact.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    prefix: dict[str, str] = {}

    def resnet(diffusers_name: str, ldm_name: str):
        for part, ldm_part in _RESNET_PARTS.items():
            exact[f"{diffusers_name}.{part}"] = f"{ldm_name}.{ldm_part}"

    down_types = list(config["down_block_types"])
    levels = len(down_types)
    layers = _per_block(config.get("layers_per_block", 2), levels)
    index = 1
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            if "CrossAttn" in block_type:
                prefix[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            exact[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {mid_type!r} has no LDM equivalent here; expected UNetMidBlock2DCrossAttn")
    resnet("mid_block.resnets.0", "middle_block.0")
    prefix["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")

    up_types = list(config["up_block_types"])
    up_layers = list(reversed(layers))
    index = 0
    for level, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for j in range(up_layers[level] + 1):
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0")
            if has_attention:
                prefix[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == up_layers[level] and level < levels - 1:
                upsampler = f"output_blocks.{index}.{2 if has_attention else 1}.conv"
                exact[f"up_blocks.{level}.upsamplers.0.conv"] = upsampler
            index += 1
    return exact, prefix


def unet_key_map(config: dict, diffusers_keys) -> dict[str, str]:
    """{diffusers weight name: LDM weight name (without `model.diffusion_model.`)} for every given key."""
    exact, prefix = unet_module_map(config)
    mapping = {}
    for key in diffusers_keys:
        module, _, leaf = key.rpartition(".")
        if module in exact:
            mapping[key] = f"{exact[module]}.{leaf}"
            continue
        parts = key.split(".")
        # attentions live at depth 4 (down_blocks.i.attentions.j) or 3 (mid_block.attentions.0)
        for depth in (4, 3):
            head = ".".join(parts[:depth])
            if head in prefix:
                mapping[key] = prefix[head] + key[len(head):]
                break
        else:
            raise ValueError(f"UNet weight {key!r} has no LDM equivalent for this config")
    return mapping


# --- detecting a UNet from LDM tensor shapes --------------------------------------------------------------------
def _count(shapes: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in shapes for m in [regex.match(key)] if m})


def unet_config_from_ldm(shapes: dict[str, tuple], family: str) -> dict:
    """A diffusers UNet2DConditionModel config from LDM UNet weight shapes (keys without the prefix).

    family 'sd15' (8 heads, conv proj_in) or 'sdxl' (64-channel heads, text_time embedding).
    """
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    out_channels = shapes["out.2.weight"][0]
    input_indices = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")})
    block_out_channels, layers_per_block, depths = [], [], []
    channels, count, level_depths = model_channels, 0, []
    for index in input_indices[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:  # a downsampler closes a level
            block_out_channels.append(channels)
            layers_per_block.append(count)
            depths.append(level_depths)
            count, level_depths = 0, []
            continue
        channels = shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0]
        count += 1
        level_depths.append(_count(shapes, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
    block_out_channels.append(channels)
    layers_per_block.append(count)
    depths.append(level_depths)
    levels = len(block_out_channels)

    for level, level_depth in enumerate(depths):
        if len(set(level_depth)) > 1:
            raise ValueError(f"UNet level {level} mixes transformer depths {level_depth}; not supported")
    transformer_depth = [d[0] if d else 0 for d in depths]
    down_types = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in transformer_depth]

    output_depths, index = [], 0
    for level in range(levels):
        level_output = []
        for _ in range(list(reversed(layers_per_block))[level] + 1):
            level_output.append(_count(shapes, rf"output_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
            index += 1
        output_depths.append(level_output)
    up_types = ["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in output_depths]
    middle_depth = _count(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if middle_depth == 0:
        raise ValueError("the UNet's middle block has no transformer; this layout is not supported")

    attention_keys = [k for k in shapes if ".transformer_blocks.0.attn2.to_k.weight" in k]
    if not attention_keys:
        raise ValueError("the UNet has no cross-attention layers; not an SD1.5/SDXL UNet")
    context_dim = shapes[attention_keys[0]][1]
    proj_in = next(k for k in shapes if k.endswith(".1.proj_in.weight"))
    if family == "sd15":
        heads: int | list[int] = SD15_NUM_HEADS
    else:
        heads = [max(1, c // SDXL_HEAD_CHANNELS) for c in block_out_channels]
    # diffusers takes the middle block's depth from the last level; keep it when that level has no attention
    down_depths = list(transformer_depth)
    if down_depths[-1] != middle_depth:
        if down_depths[-1] != 0:
            raise ValueError(f"middle block depth {middle_depth} differs from the last level's "
                             f"{down_depths[-1]}; this layout is not supported")
        down_depths[-1] = middle_depth
    reversed_default = [[d] * (n + 1) for d, n in zip(reversed(down_depths), reversed(layers_per_block))]
    config = {
        "sample_size": 128 if family == "sdxl" else 64,
        "in_channels": in_channels, "out_channels": out_channels,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block[0] if len(set(layers_per_block)) == 1 else layers_per_block,
        "down_block_types": down_types, "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "transformer_layers_per_block": down_depths,
    }
    cleaned_output = [[d if d else 1 for d in level] for level in output_depths]
    cleaned_default = [[d if d else 1 for d in level] for level in reversed_default]
    if cleaned_output != cleaned_default:
        config["reverse_transformer_layers_per_block"] = cleaned_output
    if "label_emb.0.0.weight" in shapes:
        config["projection_class_embeddings_input_dim"] = shapes["label_emb.0.0.weight"][1]
        config["addition_embed_type"] = "text_time"
    return config


# --- text encoders and VAE (diffusers / transformers names -> LDM names) --------------------------------------
def open_clip_key_map(hf_keys, num_layers: int) -> dict[str, str]:
    """transformers CLIPTextModelWithProjection -> OpenCLIP names; q/k/v go into one `in_proj` (see join)."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    mapping = {}
    for key in hf_keys:
        if key in fixed:
            mapping[key] = fixed[key]
            continue
        match = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not match or int(match.group(1)) >= num_layers:
            raise ValueError(f"text encoder weight {key!r} has no OpenCLIP equivalent")
        layer, module, leaf = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            mapping[key] = f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"
        else:
            mapping[key] = f"transformer.resblocks.{layer}.{parts[module]}.{leaf}"
    return mapping


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_map(config: dict, diffusers_keys) -> dict[str, str]:
    """AutoencoderKL weight names -> LDM `first_stage_model` names (without the prefix)."""
    levels = len(config["block_out_channels"])
    mapping = {}
    for key in diffusers_keys:
        module, _, leaf = key.rpartition(".")
        new = None
        if module in ("quant_conv", "post_quant_conv") or module.split(".")[-1] in ("conv_in", "conv_out"):
            new = module
        elif module.endswith("conv_norm_out"):
            new = module.replace("conv_norm_out", "norm_out")
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)$", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET[m[3]]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", module):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_VAE_RESNET[m[3]]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_VAE_RESNET[m[3]]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
        if new is None:
            raise ValueError(f"VAE weight {key!r} has no LDM equivalent")
        mapping[key] = f"{new}.{leaf}"
    return mapping
