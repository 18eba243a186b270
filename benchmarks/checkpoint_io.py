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
    from decoupled_dmd.trainer.formats import write_ldm_checkpoint
    from decoupled_dmd.trainer.random_models import build_parts, text_encoder_configs, unet_config, vae_config
    from decoupled_dmd.trainer.tiny_models import write_tiny_clip_tokenizer

    path = os.path.join(folder, "sdxl_random.safetensors")
    write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"), max_length=77)
    if os.path.exists(path):
        return path
    parts = build_parts(unet_config("sdxl"), text_encoder_configs("sdxl"), vae_config("sdxl"))
    return write_ldm_checkpoint(path, family="sdxl", unet=parts.unet, text_encoders=parts.text_encoders,
                                vae=parts.vae, prediction_type="epsilon", metadata={"bench": "1"}, dtype=torch.float16,
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
