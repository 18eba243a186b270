"""Tiny SD1.5- and SDXL-shaped teachers: random_models.py's tiny configs written as diffusers model folders.

They need no download: tests and the `builtin:tiny-sd15` / `builtin:tiny-sdxl` smoke models use them to run
every real code path (tokenizer files, text encoders, UNet, VAE, scheduler) in seconds on a CPU. Their
weights are random, so their images are noise: they check plumbing, not quality.
"""

from __future__ import annotations

import json
import os
import tempfile

from .random_models import (
    TINY_TOKENIZER_SPECIAL_TOKENS,
    build_parts,
    text_encoder_configs,
    unet_config,
    vae_config,
)

TINY_MODELS = ("tiny-sd15", "tiny-sd15-v", "tiny-sdxl", "tiny-flow")
TINY_MODELS_VERSION = 2  # bump when the tiny models change, so cached copies are rebuilt
_WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "house", "tree", "in", "on", "and", "with",
          "painting", "digit", "seven", "one"]


def write_tiny_clip_tokenizer(folder: str, max_length: int = 16, pad_token: str | None = None,
                              words=tuple(_WORDS)) -> str:
    """A CLIP BPE tokenizer folder (vocab.json, merges.txt): characters, `words` as whole tokens, CLIP's specials."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges = []
    for word in words:
        # Left-to-right merges build each word; the final piece carries the end-of-word marker.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        config = {"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}
        if pad_token:
            config["pad_token"] = pad_token
        json.dump(config, handle)
    return folder


def build_tiny_pipeline(folder: str, name: str = "tiny-sd15", seed: int = 0, sample_size: int = 8) -> str:
    """Write a diffusers model folder (unet, text encoder(s), tokenizer(s), scheduler, vae) with random weights.

    name: tiny-sd15 (eps), tiny-sd15-v (v-prediction), tiny-sdxl (two encoders, text_time), tiny-flow
    (pixel space, flow matching, no VAE).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    max_length = 16
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"), max_length)
    vocab_size = len(CLIPTokenizer.from_pretrained(tokenizer_dir))
    sdxl = name == "tiny-sdxl"
    pixel_space = name == "tiny-flow"
    if sdxl:
        write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer_2"), max_length, pad_token="!")  # as SDXL's
    family = "sdxl" if sdxl else "sd15"
    channels = 3 if pixel_space else 4
    parts = build_parts(
        unet_config(family, tiny=True, sample_size=sample_size, in_channels=channels, out_channels=channels),
        text_encoder_configs(family, tiny=True, vocab_size=vocab_size, max_length=max_length,
                             special_tokens=TINY_TOKENIZER_SPECIAL_TOKENS),
        None if pixel_space else vae_config(family, tiny=True, sample_size=sample_size * 2), seed=seed)
    for part, encoder in zip(("text_encoder", "text_encoder_2"), parts.text_encoders):
        encoder.save_pretrained(os.path.join(folder, part))
    parts.unet.save_pretrained(os.path.join(folder, "unet"))

    if pixel_space:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(folder, "scheduler"))
    else:
        prediction_type = "v_prediction" if name == "tiny-sd15-v" else "epsilon"
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type=prediction_type).save_pretrained(os.path.join(folder, "scheduler"))
        parts.vae.save_pretrained(os.path.join(folder, "vae"))
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as handle:
        json.dump({"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
                   "_tiny_model": name}, handle)
    return folder


def built_tiny_model(name: str) -> str:
    """The folder of tiny model `name`, built once per machine in the temp dir (`builtin:<name>`)."""
    folder = os.path.join(tempfile.gettempdir(), f"decoupled_dmd_builtin_v{TINY_MODELS_VERSION}", name)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"{name}-", dir=os.path.dirname(folder))
        build_tiny_pipeline(staging, name)
        try:
            os.replace(staging, folder)
        except OSError:  # another process won the race; its folder is equally good
            pass
    return folder


def _register() -> None:
    import functools

    from .builtins import register

    for name in TINY_MODELS:
        register(name, functools.partial(built_tiny_model, name), "random weights, for plumbing checks")


_register()
