"""A real ComfyUI server with this pack installed, for the tests in this folder (skipped without COMFYUI_ROOT).

COMFYUI_ROOT: a ComfyUI checkout (not part of this repo). COMFYUI_PYTHON: the python that runs it (default:
$COMFYUI_ROOT/.venv/bin/python if present, else this one). The server gets a temporary --base-directory
(models, input, output, custom_nodes with a symlink to this repo), so nothing is written into COMFYUI_ROOT.
The tests themselves run in the repo's environment: they build the random checkpoints with diffusers.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import pytest

ROOT = os.environ.get("COMFYUI_ROOT", "")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(REPO, "workflows")

if not ROOT:
    pytest.skip("COMFYUI_ROOT is not set: no real ComfyUI to test against", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_unet(cross_attention_dim: int, linear: bool):
    """A 320-wide, 2-level UNet: ComfyUI detects SD1.5 (768, conv proj_in) or SD2 (1024, linear) from it."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, use_linear_projection=linear).eval()


def build_tiny_sd15(path: str) -> str:
    """Random-weight SD1.5 checkpoint ComfyUI's loader accepts: tiny UNet, full CLIP-L and VAE (fp16)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from decoupled_dmd.trainer.checkpoint import write_ldm_checkpoint

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).eval()
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4).eval()
    adapter = SimpleNamespace(network=_tiny_unet(768, False), text_encoders=[clip], vae=vae, family="sd15",
                              prediction_type="epsilon")
    return write_ldm_checkpoint(path, adapter, {"note": "random weights, test only"}, overwrite=True,
                                dtype=torch.float16)


def build_tiny_sd2_unet(path: str) -> str:
    """A UNet-only file in SD2 layout (context 1024, linear proj_in): a model family the pack must refuse."""
    from safetensors.torch import save_file

    from decoupled_dmd.trainer.ldm_layout import unet_key_map

    unet = _tiny_unet(1024, True)
    state = unet.state_dict()
    keys = unet_key_map(dict(unet.config), state.keys())
    save_file({keys[k]: v.half().contiguous() for k, v in state.items()}, path)
    return path


class Server:
    def __init__(self, base: str, port: int, process, log_path: str):
        self.base, self.port, self.process, self.log_path = base, port, process, log_path
        self.url = f"http://127.0.0.1:{port}"

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, (json.loads(text) if text.strip() else {})
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def queue(self, graph: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # written when the prompt is done: success, error or interrupted
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        status, body = self.queue(graph)
        assert status == 200, body
        return self.wait(body["prompt_id"], timeout)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def peak_rss_mb(self) -> float:
        """VmHWM of the server process (Linux)."""
        with open(f"/proc/{self.process.pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfyui_base"))
    for folder in ("models/checkpoints", "models/loras", "models/diffusion_models", "custom_nodes", "input", "output"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "ComfyUI-DecoupledDMD"))
    build_tiny_sd15(os.path.join(base, "models", "checkpoints", "tiny_sd15.safetensors"))
    build_tiny_sd2_unet(os.path.join(base, "models", "diffusion_models", "tiny_sd2_unet.safetensors"))
    python = os.environ.get("COMFYUI_PYTHON") or next(
        (p for p in [os.path.join(ROOT, ".venv", "bin", "python")] if os.path.exists(p)), sys.executable)
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
             "--disable-auto-launch"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = Server(base, port, process, log_path)
    try:
        deadline = time.time() + 180
        while True:
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start; log:\n{server.log()[-4000:]}")
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(os.path.join(base, "output"), ignore_errors=True)

