"""Checkpoint I/O at real SDXL size: load a single-file checkpoint, export a kohya LoRA, stream a merged file.

Builds a random-weight SDXL-architecture checkpoint (full UNet, CLIP-L, OpenCLIP-G, VAE; fp16, ~6.9 GB) in a
folder you name, then prints seconds and peak RSS for each stage. Needs ~16 GB RAM and ~14 GB disk.

    python benchmarks/checkpoint_io.py /tmp/sdxl-bench [--rank 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def stage(name: str, started: float) -> float:
    print(f"{name:<34} {time.time() - started:7.1f} s   peak RSS {peak_rss_gb():5.1f} GB", flush=True)
    return time.time()


def build_sdxl_checkpoint(folder: str) -> str:
    """Random SDXL base-architecture parts written as one LDM-layout fp16 file (the tokenizer is a tiny stand-in)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from decoupled_dmd.trainer.formats import write_ldm_checkpoint
    from decoupled_dmd.trainer.tiny_models import write_tiny_clip_tokenizer

    path = os.path.join(folder, "sdxl_random.safetensors")
    write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"), max_length=77)
    if os.path.exists(path):
        return path
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, **common))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                        **common))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

    return write_ldm_checkpoint(path, family="sdxl", unet=unet, text_encoders=[clip_l, clip_g], vae=vae,
                                prediction_type="epsilon", metadata={"bench": "1"}, dtype=torch.float16,
                                overwrite=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weight dtype of the loaded model (the trainer's mixed_precision)")
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    from decoupled_dmd.trainer.adapters.single_file import load_single_file
    from decoupled_dmd.trainer.formats import write_merged_checkpoint
    from decoupled_dmd.trainer.networks import LoraRoles

    started = time.time()
    path = build_sdxl_checkpoint(args.folder)
    started = stage(f"build ({os.path.getsize(path) / 1e9:.2f} GB file)", started)
    adapter = load_single_file(path, tokenizer_path=os.path.join(args.folder, "tokenizer"),
                               dtype=getattr(torch, args.dtype))
    parameters = sum(p.numel() for p in adapter.network.parameters())
    started = stage(f"load single file (UNet {parameters / 1e9:.2f} B, {args.dtype})", started)
    roles = LoraRoles(adapter.network, args.rank, args.rank / 8, adapter.default_lora_target_modules())
    with torch.no_grad():
        for p in roles.trainable_parameters("student"):
            p.normal_(0, 1e-3)
    started = stage("inject student + fake LoRA", started)
    from decoupled_dmd.trainer.formats import kohya_lora_state_dict

    modules = {k[:-7]: v[:-7] for k, v in adapter.unet_ldm_keys.items() if k.endswith(".weight")}
    lora = kohya_lora_state_dict(roles.peft_state_dict("student"), modules, args.rank / 8, torch.float16)
    size = sum(v.numel() * v.element_size() for v in lora.values())
    started = stage(f"kohya LoRA ({size / 1e6:.0f} MB fp16)", started)
    out = write_merged_checkpoint(path, os.path.join(args.folder, "merged.safetensors"), adapter.unet_ldm_keys,
                                  {"bench": "merged"}, "epsilon", deltas=roles.lazy_delta_weights("student"),
                                  overwrite=True)
    stage(f"stream merged checkpoint ({os.path.getsize(out) / 1e9:.2f} GB)", started)


if __name__ == "__main__":
    main()
