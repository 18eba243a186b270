"""A real ComfyUI server with this pack installed, for the tests in this folder (skipped without COMFYUI_ROOT).

COMFYUI_ROOT: a ComfyUI checkout (not part of this repo). COMFYUI_PYTHON: the python that runs it (default:
$COMFYUI_ROOT/.venv/bin/python if present, else this one). The server gets a temporary --base-directory
(models, input, output, custom_nodes with a symlink to this repo), so nothing is written into COMFYUI_ROOT.
The tests themselves run in the repo's environment: they build the random checkpoints with diffusers.
COMFYUI_FRONTEND_ROOT: another frontend's static folder for the server (--front-end-root), e.g. a newer
comfyui-frontend-package unpacked with `pip install --target`; default: the one ComfyUI's Python has.
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

import pytest
from tiny_checkpoints import build_tiny_sd2_unet, build_tiny_sd15, build_tiny_sdxl  # this folder

ROOT = os.environ.get("COMFYUI_ROOT", "")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(REPO, "workflows")

if not ROOT:
    pytest.skip("COMFYUI_ROOT is not set: no real ComfyUI to test against", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _frontend_args() -> list[str]:
    root = os.environ.get("COMFYUI_FRONTEND_ROOT", "")
    if root and not os.path.isfile(os.path.join(root, "index.html")):
        raise RuntimeError(f"COMFYUI_FRONTEND_ROOT {root}: no index.html there (give the package's static folder)")
    return ["--front-end-root", root] if root else []


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
             "--disable-auto-launch", *_frontend_args()], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = Server(base, port, process, log_path)
    try:
        deadline = time.time() + 180
        while True:
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start; log:\n{server.log()[-4000:]}") from None
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
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
