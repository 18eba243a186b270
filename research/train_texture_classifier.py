"""Retrain the texture world's attribute classifier (seeded; a few minutes on 2 CPU cores).

    python scripts/train_texture_classifier.py [--steps 3000]

Writes demo/texture_classifier.safetensors with its per-attribute accuracy on fresh images in the metadata.
"""

import argparse
import json
import logging

import torch

from decoupled_dmd.demo.models import TEXTURE_CLASSIFIER_FILE
from decoupled_dmd.research.training import texture_classifier_accuracy, train_texture_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=TEXTURE_CLASSIFIER_FILE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = train_texture_classifier(steps=args.steps, seed=args.seed)
    accuracy = texture_classifier_accuracy(model)
    logging.info("accuracy on fresh images: %s", accuracy)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output,
              metadata={"accuracy": json.dumps(accuracy), "steps": str(args.steps), "seed": str(args.seed)})


if __name__ == "__main__":
    main()
