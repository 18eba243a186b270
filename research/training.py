"""Reproducible (seeded) training of the demo's teacher and classifier; the scripts in scripts/ call these.

The teacher is trained with the flow-matching objective diffusers' FlowMatchEuler scheduler assumes:
x_t = t * x0 + (1 - t) * noise at the paper's level t (0 noise, 1 clean), timestep (1 - t) * 1000, target
velocity noise - x0. The prompt is dropped (empty string) for a fraction of samples so the teacher also
models the unconditional distribution that classifier-free guidance needs.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time

import numpy as np
import torch
from torch import nn

from ..demo.data import TRAIN_TEMPLATES, digit_prompt, to_model_range
from ..demo.models import DigitClassifier, build_teacher_modules, save_teacher

logger = logging.getLogger(__name__)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fit(model: nn.Module, loss_of_batch, steps: int, learning_rate: float, log_every: int) -> nn.Module:
    """The classifiers' loop: AdamW (decay 1e-4), warm-up then cosine; `loss_of_batch(step)` gives the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 100))
    model.train()
    for step in range(steps):
        loss = loss_of_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            logger.info("classifier step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval().requires_grad_(False)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 1500, batch_size: int = 128,
                     learning_rate: float = 2e-3, seed: int = 0, log_every: int = 250) -> DigitClassifier:
    """Train `DigitClassifier` on (N, 784) images in [0, 1] with small random shifts (AdamW, cosine)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = torch.from_numpy(to_model_range(images))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model = DigitClassifier()

    def loss_of_batch(step: int):
        index = torch.randint(len(x_all), (batch_size,), generator=generator)
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # the same 2-pixel jitter per batch
        x = torch.roll(x_all[index], shifts=shift, dims=(2, 3))
        return nn.functional.cross_entropy(model(x), y_all[index])

    return _fit(model, loss_of_batch, steps, learning_rate, log_every)


def train_texture_classifier(steps: int = 3000, batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
                             log_every: int = 200):
    """Train the texture instrument (`TextureClassifier`) on fresh world images (AdamW, cosine): one
    cross-entropy per attribute head plus the layout head's mean square error.

    Generated images are not renders, so every training image is perturbed as a generator might draw it
    (`augment_texture_images`): texture contrast drawn in [0.2, 0.9] (the base world's 0.5, a fine-tune's 0.8),
    a whole-pixel shift of up to 3 px (the marks at any phase), a partial blur (soft marks) and Gaussian pixel
    noise; a head trained on clean renders alone read the teacher's CFG textures at 0.63."""
    from ..demo.models import TextureClassifier
    from ..demo.texture import draw_layout, layout_targets, render_layout, sample_attributes

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TextureClassifier()

    def loss_of_batch(step: int):
        attributes = sample_attributes(batch_size, generator)
        layout = draw_layout(batch_size, generator)
        contrast = 0.2 + 0.7 * torch.rand(batch_size, generator=generator)
        images = augment_texture_images(render_layout(attributes, layout, texture_contrast=contrast), generator)
        features = model.features(images)
        logits = model.heads(features)
        layout_loss = nn.functional.mse_loss(model.layout_head(features), layout_targets(layout))
        return sum(nn.functional.cross_entropy(logits[name], attributes[name]) for name in logits) + layout_loss

    model = _fit(model, loss_of_batch, steps, learning_rate, log_every)
    from ..demo.texture import sample_world

    model.calibrate(sample_world(4000, seed=99)[0])
    return model


def augment_texture_images(images: torch.Tensor, generator: torch.Generator, max_shift: int = 3,
                           max_blur: float = 0.6, max_noise: float = 0.1) -> torch.Tensor:
    """Perturb renders as a generator might draw them: shift each image by 0..`max_shift` px in x and y (edges
    replicated), blend it towards its 3x3 box blur by a weight in [0, `max_blur`] (half the images) and add
    Gaussian pixel noise of a std in [0, `max_noise`]."""
    count, size = images.shape[0], images.shape[-1]
    padded = nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (count, 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(size)      # (count, size)
    cols = shifts[:, 1, None] + torch.arange(size)
    batch = torch.arange(count)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    blurred = nn.functional.avg_pool2d(nn.functional.pad(shifted, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    weight = max_blur * torch.rand(count, 1, 1, 1, generator=generator)
    weight = weight * (torch.rand(count, 1, 1, 1, generator=generator) < 0.5)
    std = max_noise * torch.rand(count, 1, 1, 1, generator=generator)
    return shifted + weight * (blurred - shifted) + std * torch.randn(images.shape, generator=generator)


@torch.no_grad()
def texture_classifier_accuracy(model, count: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on `count` fresh world images of a seed the training never drew."""
    from ..demo.texture import sample_world

    images, _, attributes = sample_world(count, seed)
    logits = model(images)
    return {name: float((logits[name].argmax(1) == attributes[name]).float().mean()) for name in logits}


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(to_model_range(images))
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1000)])
    return float((predictions.numpy() == np.asarray(labels)).mean())


def train_teacher(folder: str, images: np.ndarray, labels: np.ndarray, steps: int = 1500, batch_size: int = 64,
                  learning_rate: float = 2e-3, uncond_probability: float = 0.2, ema_decay: float = 0.999,
                  seed: int = 0, width: int = 16, extra_info: dict | None = None, log_every: int = 20) -> str:
    """Train the MNIST teacher (flow matching) on (N, 784) images and write it as a diffusers folder."""
    x_all = torch.from_numpy(to_model_range(images))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def sample_batch(generator: torch.Generator, count: int):
        index = torch.randint(len(x_all), (count,), generator=generator)
        template = torch.randint(len(TRAIN_TEMPLATES), (count,), generator=generator)
        return x_all[index], 1 + y_all[index] * len(TRAIN_TEMPLATES) + template

    prompts = [digit_prompt(d, t) for d in range(10) for t in TRAIN_TEMPLATES]
    text_encoder, unet, tokenizer = build_teacher_modules(folder, seed=seed, width=width)
    return train_diffusion(folder, (text_encoder, unet, tokenizer), prompts, sample_batch, "flow", steps=steps,
                           batch_size=batch_size, learning_rate=learning_rate, uncond_probability=uncond_probability,
                           ema_decay=ema_decay, seed=seed, extra_info={"width": width, **(extra_info or {})},
                           log_every=log_every)


def _texture_batches(style: str):
    """(prompts, sample_batch) of the texture world in `style` for `train_diffusion`: fresh images every call,
    index 1 + i naming `prompts[i]`. An unknown style fails here, naming the known ones."""
    from ..demo.texture import all_prompts, get_style, make_prompt, render, sample_attributes

    get_style(style)
    prompts = all_prompts()
    lookup = {prompt: index for index, prompt in enumerate(prompts)}

    def sample_batch(generator: torch.Generator, count: int):
        attributes = sample_attributes(count, generator)
        chosen = [lookup[make_prompt({k: v[i] for k, v in attributes.items()})] for i in range(count)]
        return render(attributes, generator, style), 1 + torch.tensor(chosen)

    return prompts, sample_batch


def train_texture_teacher(folder: str, steps: int = 2400, batch_size: int = 32, learning_rate: float = 2e-3,
                          uncond_probability: float = 0.15, ema_decay: float = 0.999, seed: int = 0, width: int = 32,
                          noise_offset: float = 0.0357, extra_info: dict | None = None, log_every: int = 50) -> str:
    """Train the texture world's epsilon teacher on fresh images every step (the world is unlimited).

    With SDXL's offset noise (`noise_offset` 0.0357, as SDXL was trained): SD's schedule leaves the image mean
    readable at timestep 999 (alpha_bar 0.0047: over 32x32x3 pixels the signal's mean outweighs the noise's).
    """
    from ..demo.models import build_texture_teacher_modules

    prompts, sample_batch = _texture_batches("base")
    modules = build_texture_teacher_modules(folder, seed=seed, width=width)
    return train_diffusion(folder, modules, prompts, sample_batch, "epsilon", steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, uncond_probability=uncond_probability, ema_decay=ema_decay,
                           seed=seed, extra_info={"width": width, **(extra_info or {})}, log_every=log_every,
                           noise_offset=noise_offset, unet_dtype=torch.float16)


def finetune_texture_teacher(folder: str, base_dir: str, style: str = "vega", steps: int = 500, batch_size: int = 32,
                             learning_rate: float = 5e-4, uncond_probability: float = 0.15, ema_decay: float = 0.999,
                             seed: int = 0, noise_offset: float = 0.0357, extra_info: dict | None = None,
                             log_every: int = 50) -> str:
    """A creator's fine-tune of the texture teacher: the base (`base_dir`) trained further on the world in
    `style` (texture.STYLES), UNet and text encoder, as a full fine-tune would; same objective and offset noise
    as the base. Writes a diffusers folder with the base's tokenizer and scheduler."""
    import shutil

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    prompts, sample_batch = _texture_batches(style)
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(base_dir, part), os.path.join(folder, part), dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    info = {"finetuned_from": os.path.basename(os.path.normpath(base_dir)), "style": style, **(extra_info or {})}
    return train_diffusion(folder, (text_encoder, unet, tokenizer), prompts, sample_batch, "epsilon", steps=steps,
                           batch_size=batch_size, learning_rate=learning_rate, uncond_probability=uncond_probability,
                           ema_decay=ema_decay, seed=seed, extra_info=info, log_every=log_every,
                           noise_offset=noise_offset, unet_dtype=torch.float16)


def _noised(objective: str, x0: torch.Tensor, generator: torch.Generator, alphas_cumprod: torch.Tensor | None,
            noise_offset: float = 0.0):
    """(x_t, timestep, target) of one denoising-loss batch.

    flow: x_t = t x0 + (1 - t) noise at level t ~ U(0, 1), timestep (1 - t) * 1000, target velocity noise - x0
    (diffusers' FlowMatchEuler convention); epsilon: DDPM x_t = sqrt(a) x0 + sqrt(1 - a) noise at a uniform
    integer timestep, target the noise. `noise_offset` adds a per-image, per-channel constant to the noise
    (offset noise).
    """
    count = len(x0)
    noise = torch.randn(x0.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((count, x0.shape[1], 1, 1), generator=generator)
    if objective == "flow":
        level = torch.rand(count, generator=generator)
        t = level.view(-1, 1, 1, 1)
        return t * x0 + (1.0 - t) * noise, (1.0 - level) * 1000.0, noise - x0
    timestep = torch.randint(len(alphas_cumprod), (count,), generator=generator)
    alpha_bar = alphas_cumprod[timestep].view(-1, 1, 1, 1).float()
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise, timestep, noise


def train_diffusion(folder: str, modules: tuple, prompts: list[str], sample_batch, objective: str, steps: int,
                    batch_size: int, learning_rate: float, uncond_probability: float, ema_decay: float, seed: int,
                    extra_info: dict | None = None, log_every: int = 20, noise_offset: float = 0.0,
                    unet_dtype: torch.dtype = torch.float32) -> str:
    """Train a demo teacher (UNet and text encoder together) and write it as a diffusers folder.

    `modules`: (text_encoder, unet, tokenizer); `sample_batch(generator, n)` gives (x0, prompt index), index 0
    the empty prompt and i the prompt `prompts[i - 1]`. The prompt is dropped to the empty string for a
    fraction `uncond_probability` of samples, so the teacher also models the unconditional distribution CFG
    needs. The saved weights are the exponential moving average of the trained ones (decay `ema_decay`, with
    the usual (1 + n) / (10 + n) warm-up); the UNet is stored in `unet_dtype`.
    """
    text_encoder, unet, tokenizer = modules
    generator = torch.Generator().manual_seed(seed)
    alphas_cumprod = None
    if objective == "epsilon":
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    token_ids = tokenizer([""] + list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    modules = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 100))
    started, running = time.time(), None
    for step in range(steps):
        x0, prompt_index = sample_batch(generator, batch_size)
        dropped = torch.rand(batch_size, generator=generator) < uncond_probability
        prompt_index = torch.where(dropped, torch.zeros_like(prompt_index), prompt_index)
        x_t, timestep, target = _noised(objective, x0, generator, alphas_cumprod, noise_offset)
        hidden = modules["text_encoder"](token_ids[prompt_index]).last_hidden_state
        prediction = modules["unet"](x_t, timestep, encoder_hidden_states=hidden).sample
        loss = nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), modules.parameters()):
                averaged.lerp_(current, 1.0 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            logger.info("teacher step %d/%d loss %.4f (%.1f s)", step + 1, steps, running, time.time() - started)
    info = {"train_steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "objective": objective,
            "noise_offset": noise_offset,
            "uncond_probability": uncond_probability, "ema_decay": ema_decay, "seed": seed,
            "final_loss": running, "train_seconds": round(time.time() - started, 1), **(extra_info or {})}
    return save_teacher(folder, ema["text_encoder"], ema["unet"], info, unet_dtype=unet_dtype)
