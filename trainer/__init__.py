"""Decoupled DMD trainer: pure math, the denoiser contract and its adapters, the accelerate loop, the CLI.

Importable without ComfyUI; only trainer/adapters/comfy.py (when it exists) imports comfy, lazily.
"""
