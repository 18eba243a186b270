"""Sample quality of the demo's teachers and students, measured with each world's shipped classifier.

- prompt adherence: mean probability the classifier gives the class the prompt asks for, per attribute (the
  digit; or colour, texture, shape, background), and top-1 accuracy (every attribute right);
- Frechet distance of classifier features to the teacher's own 50-step CFG samples (the distillation target),
  with its noise floor: the same distance between two teacher sample sets that differ only in the seed; and
  to real images of the same prompts, with its own floor;
- texture fidelity: the texture head's accuracy, and the fine-structure energy against real data;
- style (RGB worlds): the background's colour cast (`tint`), and against real data of a graded style
  (`tint_ratio`: 1 is the style's full cast, 0 the base world's greys);
- per-image mean, variance and saturation (fraction of pixels pushed beyond the data range, |x| > 1.1, before
  any clipping): the paper's collapse signal. (MNIST's black background sits exactly at -1, so "at the
  range's edge" would count most of every real digit.)
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

REFERENCE_SEEDS = (1000, 2000)  # teacher seeds of the reference set and of the noise-floor set
REFERENCE_PER_PROMPT = 50        # 10 prompts x 50 = 500 reference samples per seed
TEACHER_STEPS = 50
SATURATION_LEVEL = 1.1


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the trace term through symmetric eigenvalues."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1  # similar to S1 S2, symmetric PSD: tr sqrt = sum sqrt(eigenvalues)
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = features.double().numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def image_statistics(images: Tensor) -> dict[str, float]:
    """Batch means of each image's mean and variance, and the fraction of pixels beyond the data range
    (|x| > 1.1), all on the unclipped samples."""
    flat = images.float().flatten(1)
    return {"image_mean": flat.mean(1).mean().item(), "image_var": flat.var(1, unbiased=False).mean().item(),
            "saturation": (flat.abs() > SATURATION_LEVEL).float().mean().item()}


REAL_SEEDS = (0, 1)  # the real-data set the samples are compared with, and the one of its noise floor


def high_frequency_energy(images: Tensor) -> Tensor:
    """Per-image mean square of what a 3x3 box blur removes (the fine structure: texture marks, edges)."""
    x = images.float().clamp(-1.0, 1.0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(padded, 3, stride=1)
    return (x - blurred).pow(2).flatten(1).mean(dim=1)


class Evaluator:
    """Scores unclipped samples (B, C, H, W) in model range against their prompts, the teacher reference and the
    world's real data (the classifier sees them clipped to [-1, 1], as a picture would show them).

    Metrics: `adherence` (mean over attributes of the probability the classifier gives the asked class) and
    `adherence_<attribute>`, `accuracy_<attribute>`, `top1` (every attribute right); `frechet` to the
    teacher's CFG samples (the distillation target) and `frechet_real` to real images of the same prompts;
    `hf_energy_ratio` (fine-structure energy over that of the real images: below 1 is washed out, above 1
    over-sharpened); per-image mean, variance and saturation.
    """

    def __init__(self, reference_file: str | None = None, classifier=None, world="mnist", split: str = "validation"):
        from .worlds import get_world

        self.world = get_world(world)
        reference_file = self.world.reference_file if reference_file is None else reference_file
        self.classifier = classifier or self.world.load_classifier()
        self.reference = None
        self.reference_features: np.ndarray | None = None  # per-sample features of a split reference
        self.split = split
        self._real: dict = {}
        if reference_file and os.path.isfile(reference_file):
            from safetensors.torch import load_file

            stored = {k: v.double().numpy() for k, v in load_file(reference_file).items()}
            if f"{split}_features" in stored:  # a protocol reference: one feature set per split (protocol.py)
                from .protocol import SPLITS, get_split

                get_split(split)
                other = next(name for name in SPLITS if name != split)
                self.reference_features = stored[f"{split}_features"]
                self._floor_features = stored[f"{other}_features"]
                mu, sigma = feature_statistics(torch.from_numpy(self.reference_features))
                self.reference = {"mu": mu, "sigma": sigma}
            else:
                self.reference = stored

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({attribute: probabilities (B, classes)}, features (B, 64)): the features the Frechet distance
        compares (standardised where the classifier has a standardisation)."""
        features = torch.cat([self.classifier.features(chunk) for chunk in images.float().split(500)])
        probabilities = {k: torch.softmax(v, dim=1) for k, v in self.classifier.heads(features).items()}
        standardize = getattr(self.classifier, "standardize", None)
        return probabilities, (standardize(features) if standardize else features)

    def real_statistics(self, prompts: list[str], seed: int = REAL_SEEDS[0]) -> dict:
        """Feature statistics and fine-structure energy of real images for `prompts` (cached)."""
        key = (tuple(prompts), seed)
        if key not in self._real:
            images = self.world.real_images(prompts, seed)
            _, features = self.classify(images)
            mu, sigma = feature_statistics(features)
            self._real[key] = {"mu": mu, "sigma": sigma, "hf": high_frequency_energy(images).mean().item(),
                               "tint": _tint(self.world, images)}
        return self._real[key]

    def real_noise_floor(self, prompts: list[str]) -> float:
        """Frechet distance between two real sets for `prompts` that differ only in the seed."""
        first, second = (self.real_statistics(prompts, seed) for seed in REAL_SEEDS)
        return frechet_distance(first["mu"], first["sigma"], second["mu"], second["sigma"])

    def __call__(self, images: Tensor, prompts: list[str]) -> dict[str, float]:
        return self.score(images, prompts)[0]

    def score(self, images: Tensor, prompts: list[str]) -> tuple[dict[str, float], dict[str, Tensor]]:
        """The metrics, and what they were averaged from per sample (for bootstrap intervals): `features`,
        `top1` and, on worlds with a texture, `texture` (the head right) and `texture_spectrum` (the
        classifier-free reader right)."""
        labels = self.world.labels(prompts)
        probabilities, features = self.classify(images)
        rows = torch.arange(len(prompts))
        metrics: dict[str, float] = {}
        per_sample: dict[str, Tensor] = {"features": features}
        correct = torch.ones(len(prompts), dtype=torch.bool)
        for name, asked in labels.items():
            metrics[f"adherence_{name}"] = probabilities[name][rows, asked].mean().item()
            hits = probabilities[name].argmax(1) == asked
            metrics[f"accuracy_{name}"] = hits.float().mean().item()
            correct &= hits
            if name == "texture":  # per texture value, and the classifier-free spectrum reading (texture.read_texture)
                from .texture import read_texture

                for index, value in enumerate(self.world.attributes["texture"]):
                    if (asked == index).any():
                        metrics[f"accuracy_texture_{value}"] = hits[asked == index].float().mean().item()
                per_sample["texture"] = hits
                per_sample["texture_spectrum"] = read_texture(images) == asked
                metrics["texture_spectrum_accuracy"] = per_sample["texture_spectrum"].float().mean().item()
        metrics["adherence"] = float(np.mean([metrics[f"adherence_{name}"] for name in labels]))
        per_sample["top1"] = correct
        metrics["top1"] = correct.float().mean().item()
        mu, sigma = feature_statistics(features)
        if self.reference is not None:
            metrics["frechet"] = frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"])
        real = self.real_statistics(prompts)
        metrics["frechet_real"] = frechet_distance(mu, sigma, real["mu"], real["sigma"])
        metrics["hf_energy_ratio"] = high_frequency_energy(images).mean().item() / max(real["hf"], 1e-12)
        tint = _tint(self.world, images)
        if tint is not None:
            metrics["tint"] = tint
            if abs(real["tint"]) > 0.05:  # a graded style (texture.STYLES): how much of its colour cast is there
                metrics["tint_ratio"] = tint / real["tint"]
        metrics.update(image_statistics(images))
        return metrics, per_sample

    def noise_floor(self, count: int) -> float | None:
        """Frechet distance of `count` teacher samples of another seed to the reference (nearest size shipped;
        a protocol reference: a prompt-balanced `count` of the other split's reference samples)."""
        if self.reference is None:
            return None
        if self.reference_features is not None:
            features = self._floor_features
            groups = len(self.world.grid_prompts())
            per, total = max(1, min(count, len(features)) // groups), len(features) // groups
            index = np.array([p * total + i for p in range(groups) for i in range(per)])
            mu, sigma = feature_statistics(torch.from_numpy(features[index]))
            return frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"])
        sizes = self.reference["floor_sizes"]
        return float(self.reference["floor_values"][int(np.abs(sizes - count).argmin())])


def _tint(world, images: Tensor) -> float | None:
    """Mean background colour cast (texture.background_tint) of RGB worlds; None for grey ones."""
    if images.shape[1] != 3:
        return None
    from .texture import background_tint

    return background_tint(images).mean().item()


def evaluation_prompts(per_prompt: int, world="mnist") -> list[str]:
    """Each of the world's grid prompts `per_prompt` times, grouped by prompt."""
    from .worlds import get_world

    return get_world(world).evaluation_prompts(per_prompt)


@torch.no_grad()
def teacher_samples(adapter, prompts: list[str], seed: int, guidance_scale: float, steps: int = TEACHER_STEPS,
                    batch_size: int = 250, denoiser=None, sampler=None) -> Tensor:
    """Teacher CFG samples, unclipped (Euler in x0 space; guidance 1 is the unguided teacher).

    `denoiser`: the teacher as the trainer runs it (LoRA adapters off); default the adapter's own backbone.
    `sampler(denoiser, noise, cond, uncond, guidance_scale, steps)`: default the trainer's `cfg_sample`
    (solvers.py passes diffusers' schedulers).
    """
    from ..trainer.sampling import cfg_sample

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *adapter.latent_shape(*adapter.default_resolution)), generator=generator)
    denoiser = denoiser or adapter.denoiser()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = adapter.encode_prompts(chunk)
        uncond = adapter.encode_prompts([""] * len(chunk))
        out.append((sampler or cfg_sample)(denoiser, noise[start:start + len(chunk)], cond, uncond, guidance_scale,
                                           steps))
    return torch.cat(out)


def build_reference(teacher_dir: str | None = None, guidance_scale: float = 3.0, output: str | None = None,
                    per_prompt: int = REFERENCE_PER_PROMPT, world="mnist", steps: int = TEACHER_STEPS) -> dict:
    """Classifier-feature statistics of the teacher's `steps`-step CFG samples (seed A) and the noise floor
    (seed B), at the sample counts up to the reference's own.

    Also logs the guidance study: the unguided teacher against several CFG scales.
    """
    from safetensors.torch import save_file

    from ..trainer.adapters.diffusers import DiffusersAdapter
    from .worlds import get_world

    world = get_world(world)
    teacher_dir = teacher_dir or world.teacher_dir
    output = output or world.reference_file
    adapter = DiffusersAdapter.from_pretrained(teacher_dir)
    evaluator = Evaluator(reference_file="", world=world)
    prompts = world.evaluation_prompts(per_prompt)
    groups = len(world.grid_prompts())
    samples = {seed: teacher_samples(adapter, prompts, seed, guidance_scale, steps) for seed in REFERENCE_SEEDS}
    mu, sigma = feature_statistics(evaluator.classify(samples[REFERENCE_SEEDS[0]])[1])
    _, other_features = evaluator.classify(samples[REFERENCE_SEEDS[1]])
    sizes = sorted({size for size in (100, 200) if size < len(prompts)} | {len(prompts)})
    floors = []
    for size in sizes:
        # a prompt-balanced subset: `size // groups` samples of each prompt
        per = max(1, size // groups)
        index = torch.tensor([p * per_prompt + i for p in range(groups) for i in range(per)])
        floors.append(frechet_distance(*feature_statistics(other_features[index]), mu, sigma))
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
               "floor_sizes": torch.tensor(sizes, dtype=torch.float64), "floor_values": torch.tensor(floors)},
              output, metadata={"guidance_scale": str(guidance_scale), "teacher_steps": str(steps),
                                "per_prompt": str(per_prompt), "seeds": str(list(REFERENCE_SEEDS)),
                                "world": world.name})
    summary = {"noise_floor": dict(zip(map(str, sizes), floors))}
    full = Evaluator(reference_file=output, world=world)
    few = world.evaluation_prompts(max(1, 100 // groups))
    for scale in sorted({1.0, 2.0, guidance_scale, 5.0}):
        scores = full(teacher_samples(adapter, few, 7, scale, steps), few)
        summary[f"cfg_{scale:g}"] = scores
        logger.info("teacher cfg %.1f: %s", scale, {k: round(v, 4) for k, v in scores.items()})
    logger.info("noise floor by sample count: %s", summary["noise_floor"])
    index_file = os.path.join(teacher_dir, "model_index.json")
    with open(index_file, encoding="utf-8") as handle:
        index = json.load(handle)
    index["reference"] = summary
    with open(index_file, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
    return summary
