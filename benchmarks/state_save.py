"""What a resumable state costs at the SDXL plan: bytes and seconds to save one, for choosing the default periodic
save (`save_every_n_steps`).

The state of a LoRA run holds the student and fake LoRAs (fp32), their AdamW moments and the student's EMA; at
SDXL size with rank 64 that is what this writes, through accelerate's own `save_state` (safetensors for the
weights, torch.save for the optimisers), on tensors of exactly those shapes (the UNet itself is built on the meta
device: only the LoRA shapes are read from it). Prints the size and the seconds of three saves (fsync'd).

    python benchmarks/state_save.py /tmp/state-bench [--rank 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch


def lora_shapes(rank: int) -> list[tuple[int, ...]]:
    """The shapes of every LoRA A and B of the trainer's default targets on the full SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from decoupled_dmd.trainer.adapters.diffusers import UNET_LORA_TARGETS
    from decoupled_dmd.trainer.random_models import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sdxl"))
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank / 8, target_modules=UNET_LORA_TARGETS))
    return [tuple(p.shape) for name, p in unet.named_parameters() if "lora_" in name]


def fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def main() -> None:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    shapes = lora_shapes(args.rank)
    roles = {}
    for role in ("student", "fake", "student_ema"):
        module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(shape) * 0.01) for shape in shapes])
        roles[role] = module
    accelerator = Accelerator(cpu=True)
    optimizers = []
    for role in ("student", "fake"):
        optimizer = torch.optim.AdamW(roles[role].parameters(), lr=1e-5)
        sum(p.sum() for p in roles[role].parameters()).backward()
        optimizer.step()  # the moments exist, as after the first update
        optimizers.append(optimizer)
    prepared = accelerator.prepare(*roles.values(), *optimizers)
    del prepared
    parameters = sum(torch.Size(s).numel() for s in shapes)
    print(f"SDXL LoRA rank {args.rank}: {len(shapes) // 2} modules, {parameters / 1e6:.1f} M parameters a role")
    for attempt in range(3):
        target = os.path.join(args.folder, f"state-{attempt}")
        shutil.rmtree(target, ignore_errors=True)
        started = time.time()
        accelerator.save_state(target)
        fsync_tree(target)
        seconds = time.time() - started
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(target) for f in files)
        print(f"save {attempt + 1}: {size / 2**30:.2f} GiB in {seconds:.1f} s ({size / 2**20 / seconds:.0f} MiB/s)")
        shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    main()
