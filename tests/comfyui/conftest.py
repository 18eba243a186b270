"""A real ComfyUI server with this pack installed, for the tests in this folder (skipped without COMFYUI_ROOT).

COMFYUI_ROOT: a ComfyUI checkout (not part of this repo). COMFYUI_PYTHON: the python that runs it (default:
$COMFYUI_ROOT/.venv/bin/python if present, else this one). The server gets a temporary --base-directory
(models, input, output, custom_nodes with a symlink to this repo), so nothing is written into COMFYUI_ROOT.
The tests themselves run in the repo's environment: they build the random checkpoints with diffusers.
COMFYUI_FRONTEND_ROOT: another frontend's static folder for the server (--front-end-root), e.g. a newer
comfyui-frontend-package unpacked with `pip install --target`; default: the one ComfyUI's Python has.
"""

import os
import shutil

import pytest
from server_process import REPO, ROOT, make_base, start_server  # this folder
from tiny_checkpoints import build_tiny_sd2_unet, build_tiny_sd15, build_tiny_sdxl  # this folder

WORKFLOWS = os.path.join(REPO, "workflows")

if not ROOT:
    pytest.skip("COMFYUI_ROOT is not set: no real ComfyUI to test against", allow_module_level=True)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfyui_base"))
    make_base(base)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "ComfyUI-DecoupledDMD"))
    build_tiny_sd15(os.path.join(base, "models", "checkpoints", "tiny_sd15.safetensors"))
    build_tiny_sd2_unet(os.path.join(base, "models", "diffusion_models", "tiny_sd2_unet.safetensors"))
    try:
        with start_server(base) as server:
            yield server
    finally:
        shutil.rmtree(os.path.join(base, "output"), ignore_errors=True)


TINY_SDXL_FILE = "tiny_sdxl_vega_v1.safetensors"  # change the version when build_tiny_sdxl changes


@pytest.fixture(scope="session")
def tiny_sdxl(comfy_server, tmp_path_factory):
    """The random SDXL checkpoint in the server's models/checkpoints (built once per session: ~1 min, ~7 GB peak
    RSS while building, 1.9 GB file). COMFYUI_TEST_CACHE: a folder that keeps the built file between sessions;
    without it the file is deleted at the end of the session."""
    cache = os.environ.get("COMFYUI_TEST_CACHE") or str(tmp_path_factory.mktemp("sdxl_cache"))
    os.makedirs(cache, exist_ok=True)
    built = os.path.join(cache, TINY_SDXL_FILE)
    if not os.path.isfile(built):
        build_tiny_sdxl(built)
    target = os.path.join(comfy_server.base, "models", "checkpoints", TINY_SDXL_FILE)
    if not os.path.lexists(target):
        os.symlink(built, target)
    yield TINY_SDXL_FILE
    if not os.environ.get("COMFYUI_TEST_CACHE"):
        os.remove(built)
