"""Shared fixtures: tiny teachers built once per session from config with the real diffusers classes."""

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function kind -> folder of a tiny diffusers teacher (built once per kind)."""
    from decoupled_dmd.trainer.tiny_models import build_tiny_pipeline

    built = {}

    def get(name: str = "tiny-sd15") -> str:
        if name not in built:
            built[name] = build_tiny_pipeline(str(tmp_path_factory.mktemp(name)), name)
        return built[name]

    return get


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of the cat\na red house\n# a comment line\n\nthe dog in the tree\na blue painting\n")
    return str(path)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("accelerate").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def ldm_checkpoint(tiny_model_dir, tmp_path_factory):
    """Returns a function (kind, dtype) -> a single-file LDM-layout checkpoint of that tiny teacher."""
    import torch

    from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
    from decoupled_dmd.trainer.formats import write_ldm_checkpoint

    built = {}

    def get(kind: str = "tiny-sd15", dtype=torch.float16) -> str:
        if (kind, dtype) not in built:
            adapter = DiffusersAdapter.from_pretrained(tiny_model_dir(kind))
            path = str(tmp_path_factory.mktemp("ldm") / f"{kind}.safetensors")
            built[kind, dtype] = write_ldm_checkpoint(
                path, family=adapter.family, unet=adapter.network, text_encoders=adapter.text_encoders,
                vae=adapter.vae, prediction_type=adapter.prediction_type, metadata={"source": "test"}, dtype=dtype)
        return built[kind, dtype]

    return get
