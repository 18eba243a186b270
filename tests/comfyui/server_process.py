"""A ComfyUI server process for the tests in this folder: start one on a free loopback port with a temporary
--base-directory, talk to its HTTP API, stop it. COMFYUI_ROOT, COMFYUI_PYTHON and COMFYUI_FRONTEND_ROOT: see
conftest.py."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.environ.get("COMFYUI_ROOT", "")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def make_base(base: str) -> None:
    """A ComfyUI --base-directory: its model, input and output folders and an empty custom_nodes/."""
    for folder in ("models/checkpoints", "models/loras", "models/diffusion_models", "custom_nodes", "input", "output"):
        os.makedirs(os.path.join(base, folder), exist_ok=True)


@contextlib.contextmanager
def start_server(base: str, extra_args: tuple[str, ...] = (), log_name: str = "server.log"):
    """ComfyUI on a free loopback port with `base` as its base directory (and ComfyUI's own `extra_args`, e.g.
    `--fp8_e4m3fn-unet`), until the block ends; its console goes to `base`/`log_name`."""
    python = os.environ.get("COMFYUI_PYTHON") or next(
        (p for p in [os.path.join(ROOT, ".venv", "bin", "python")] if os.path.exists(p)), sys.executable)
    port = _free_port()
    log_path = os.path.join(base, log_name)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
             "--disable-auto-launch", *_frontend_args(), *extra_args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
