"""Model adapters implementing `ModelAdapter` (see trainer/denoiser.py)."""
