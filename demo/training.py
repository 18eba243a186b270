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
import time

import numpy as np
import torch
from torch import nn

from .data import TRAIN_TEMPLATES, digit_prompt, to_model_range
from .models import DigitClassifier, build_teacher_modules, save_teacher

logger = logging.getLogger(__name__)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 1500, batch_size: int = 128,
                     learning_rate: float = 2e-3, seed: int = 0, log_every: int = 250) -> DigitClassifier:
    """Train `DigitClassifier` on (N, 784) images in [0, 1] with small random shifts (AdamW, cosine)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = torch.from_numpy(to_model_range(images))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 100))
    model.train()
    for step in range(steps):
        index = torch.randint(len(x_all), (batch_size,), generator=generator)
        x = x_all[index]
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # the same 2-pixel jitter per batch
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = nn.functional.cross_entropy(model(x), y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            logger.info("classifier step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(to_model_range(images))
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1000)])
    return float((predictions.numpy() == np.asarray(labels)).mean())


def train_teacher(folder: str, images: np.ndarray, labels: np.ndarray, steps: int = 1500, batch_size: int = 64,
                  learning_rate: float = 2e-3, uncond_probability: float = 0.2, ema_decay: float = 0.999,
                  seed: int = 0, width: int = 16, extra_info: dict | None = None, log_every: int = 20) -> str:
    """Train the demo teacher (UNet and text encoder together) and write it as a diffusers folder.

    The saved weights are the exponential moving average of the trained ones (decay `ema_decay`, with
    the usual (1 + n) / (10 + n) warm-up).
    """
    generator = torch.Generator().manual_seed(seed)
    text_encoder, unet, tokenizer = build_teacher_modules(folder, seed=seed, width=width)
    x_all = torch.from_numpy(to_model_range(images))
    y_all = np.asarray(labels, dtype=np.int64)
    prompts = [""] + [digit_prompt(d, t) for d in range(10) for t in TRAIN_TEMPLATES]
    token_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    modules = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, 100))
    started, running = time.time(), None
    for step in range(steps):
        index = torch.randint(len(x_all), (batch_size,), generator=generator)
        x0 = x_all[index]
        template = torch.randint(len(TRAIN_TEMPLATES), (batch_size,), generator=generator)
        prompt_index = 1 + torch.from_numpy(y_all[index.numpy()]) * len(TRAIN_TEMPLATES) + template
        dropped = torch.rand(batch_size, generator=generator) < uncond_probability
        prompt_index = torch.where(dropped, torch.zeros_like(prompt_index), prompt_index)
        level = torch.rand(batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = level.view(-1, 1, 1, 1)
        x_t = t * x0 + (1.0 - t) * noise
        hidden = modules["text_encoder"](token_ids[prompt_index]).last_hidden_state
        velocity = modules["unet"](x_t, (1.0 - level) * 1000.0, encoder_hidden_states=hidden).sample
        loss = nn.functional.mse_loss(velocity, noise - x0)
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
    info = {"train_steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "uncond_probability": uncond_probability, "ema_decay": ema_decay, "seed": seed, "width": width,
            "final_loss": running, "train_seconds": round(time.time() - started, 1), **(extra_info or {})}
    return save_teacher(folder, ema["text_encoder"], ema["unet"], info)
