"""Retrain the texture world's teacher (seeded; about 20 minutes on 2 CPU cores), then its reference statistics.

    python scripts/train_texture_teacher.py [--steps 2400] [--threads 2]

The shipped teacher is this script's default run. Writes demo/texture_teacher/ (a diffusers folder: epsilon
prediction on SDXL's scheduler) and, unless --skip_reference, demo/texture_reference.safetensors (classifier
features of the teacher's CFG samples for the Frechet distance; run scripts/train_texture_classifier.py first).
"""

import argparse
import logging

import torch

from decoupled_dmd.demo.models import TEXTURE_TEACHER_DIR
from decoupled_dmd.research.training import train_texture_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the shipped run used 2)")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="the CFG scale the demo recommends")
    parser.add_argument("--skip_reference", action="store_true", help="train only; build the reference later")
    parser.add_argument("--reference_per_prompt", type=int, default=32,
                        help="reference samples per evaluation prompt (16 prompts; 32 gives 512 per seed)")
    parser.add_argument("--reference_only", action="store_true", help="keep the weights, rebuild the reference")
    parser.add_argument("--output", default=TEXTURE_TEACHER_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.reference_only:
        train_texture_teacher(args.output, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                              width=args.width, extra_info={"guidance_scale": args.guidance_scale, "world": "texture",
                                                            "data": "the texture world, fresh images every step"})
    if not args.skip_reference:
        from decoupled_dmd.demo.evidence import build_reference  # the protocol's reference: one set per split
        from decoupled_dmd.demo.worlds import TextureWorld

        build_reference(TextureWorld(teacher_dir=args.output), per_prompt=args.reference_per_prompt)


if __name__ == "__main__":
    main()
