"""Regenerate workflows/<name>.png: run each workflow in a running ComfyUI (with this pack installed) on a small
checkpoint and save the image it produces, with the UI workflow embedded as ComfyUI does it (the PNG's
`workflow` text chunk, from `extra_data.extra_pnginfo`; `prompt` holds the API graph that was actually run), so
dragging the PNG into ComfyUI restores the graph.

The graphs run with tiny settings (64x64, 2 training iterations, rank 4) on whatever checkpoint you name; the
embedded UI workflow is the shipped workflows/<name>.json, unchanged. With the random test checkpoint the images
are noise.

    python tests/comfyui/tiny_checkpoints.py sdxl <ComfyUI base>/models/checkpoints/tiny_sdxl_vega_v1.safetensors
    python tests/comfyui/make_workflow_pngs.py --url http://127.0.0.1:8188 --checkpoint tiny_sdxl_vega_v1.safetensors

Order: template 1 first (its LoRA feeds the two sample workflows; it also stands in for the style LoRA of
template 2 and for both the style and the speed LoRA of template 3). Each distil run writes to
output/decoupled_dmd/<run>/ and models/loras|checkpoints of that ComfyUI (the names get a counter when they exist).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from train_inputs import set_train_inputs
from workflow_names import DISTIL, DISTIL_SPEED, DISTIL_STYLE, SAMPLE_FEW_STEP, SAMPLE_STOCK  # this folder

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows")
TINY_TRAIN = dict(prompts="a photo of a cat\na red house", resolution=64, max_train_steps=2, network_dim=4,
                  network_alpha=4.0, learning_rate=1e-3, fake_updates_per_step=1, preview_every=1, save_every=0,
                  mixed_precision="no", gradient_checkpointing=True, resume=False,
                  preview_prompts="a photo of a cat sitting on a windowsill")


class Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _open(self, route: str, body: dict | None = None, timeout: float = 60):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def run(self, graph: dict, workflow: dict, timeout: float = 1800) -> dict:
        """POST /prompt as the ComfyUI frontend does (UI workflow in extra_pnginfo) and wait for the result."""
        body = {"prompt": graph, "client_id": uuid.uuid4().hex, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
        try:
            prompt_id = json.loads(self._open("/prompt", body))["prompt_id"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"ComfyUI refused the graph: {error.read().decode(errors='replace')}") from None
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = json.loads(self._open(f"/history/{prompt_id}"))
            if prompt_id in history:
                entry = history[prompt_id]
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(entry['status'])[:4000]}")
                return entry
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def image(self, info: dict) -> bytes:
        query = urllib.parse.urlencode({k: info[k] for k in ("filename", "subfolder", "type")})
        return self._open(f"/view?{query}")


def _load(name: str) -> tuple[dict, dict]:
    with open(os.path.join(WORKFLOWS, "api", f"{name}.api.json"), encoding="utf-8") as handle:
        graph = json.load(handle)
    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as handle:
        workflow = json.load(handle)
    return graph, workflow


def _saved_image(entry: dict, node_id: str) -> dict:
    images = [i for i in entry["outputs"].get(node_id, {}).get("images", []) if i.get("type") == "output"]
    if not images:
        raise RuntimeError(f"node {node_id} saved no image: {json.dumps(entry['outputs'])[:2000]}")
    return images[0]


def _written(entry: dict, node_id: str) -> list[str]:
    """File names Save Distilled wrote (its ui text: full paths)."""
    return [os.path.basename(p) for p in entry["outputs"].get(node_id, {}).get("text", [])]


def _tiny_distil(graph: dict, checkpoint: str, run: str, save_checkpoint: bool) -> dict:
    graph["1"]["inputs"]["ckpt_name"] = checkpoint
    set_train_inputs(graph, add_settings=False, **TINY_TRAIN, output_name=run)  # the shipped graph's shape
    graph["4"]["inputs"].update(lora_name=f"{run}_lora", checkpoint_name=run, save_checkpoint=save_checkpoint)
    graph["11"]["inputs"].update(width=64, height=64)
    graph["14"]["inputs"]["filename_prefix"] = f"workflow_png_{run}"
    return graph


def make_pngs(url: str, checkpoint: str, out_dir: str = WORKFLOWS, run_prefix: str = "png",
              log=print) -> dict[str, str]:
    """Run the five workflows and write <out_dir>/<name>.png; returns {name: path}."""
    client = Client(url)
    written: dict[str, str] = {}

    def save(name: str, entry: dict, node_id: str):
        path = os.path.join(out_dir, f"{name}.png")
        with open(path, "wb") as handle:
            handle.write(client.image(_saved_image(entry, node_id)))
        written[name] = path
        log(f"{name}: {path} ({os.path.getsize(path)} bytes)")

    started = time.time()
    graph, workflow = _load(DISTIL)
    entry = client.run(_tiny_distil(graph, checkpoint, f"{run_prefix}_student", save_checkpoint=True), workflow)
    save(DISTIL, entry, "14")
    lora, student_checkpoint = _written(entry, "4")
    log(f"  {DISTIL} took {time.time() - started:.0f} s; wrote {lora}, {student_checkpoint}")

    graph, workflow = _load(SAMPLE_FEW_STEP)
    graph["1"]["inputs"]["ckpt_name"] = checkpoint
    graph["7"]["inputs"]["lora_name"] = graph["4"]["inputs"]["metadata_file"] = lora
    graph["3"]["inputs"].update(width=64, height=64)
    graph["6"]["inputs"]["filename_prefix"] = "workflow_png_sample_few_step"
    save(SAMPLE_FEW_STEP, client.run(graph, workflow), "6")

    graph, workflow = _load(SAMPLE_STOCK)
    graph["1"]["inputs"]["ckpt_name"] = checkpoint
    graph["2"]["inputs"]["lora_name"] = lora
    graph["4"]["inputs"].update(width=64, height=64)
    graph["7"]["inputs"]["filename_prefix"] = "workflow_png_sample_stock_nodes"
    save(SAMPLE_STOCK, client.run(graph, workflow), "7")

    started = time.time()
    graph, workflow = _load(DISTIL_STYLE)
    graph = _tiny_distil(graph, checkpoint, f"{run_prefix}_style_student", save_checkpoint=False)
    graph["9"]["inputs"]["lora_name"] = lora  # stand-in for a style LoRA: the student LoRA made above
    save(DISTIL_STYLE, client.run(graph, workflow), "14")
    log(f"  {DISTIL_STYLE} took {time.time() - started:.0f} s")

    started = time.time()
    graph, workflow = _load(DISTIL_SPEED)
    graph = _tiny_distil(graph, checkpoint, f"{run_prefix}_own_student", save_checkpoint=False)
    graph["9"]["inputs"]["lora_name"] = lora  # stand-ins: the student LoRA made above as style and speed LoRA
    graph["3"]["inputs"]["network_weights"] = lora
    save(DISTIL_SPEED, client.run(graph, workflow), "14")
    log(f"  {DISTIL_SPEED} took {time.time() - started:.0f} s")
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="the running ComfyUI")
    parser.add_argument("--checkpoint", required=True,
                        help="an SD1.5/SDXL checkpoint in that ComfyUI's models/checkpoints (e.g. the tiny SDXL)")
    parser.add_argument("--out-dir", default=WORKFLOWS, help="where the PNGs go (default: workflows/)")
    parser.add_argument("--run-prefix", default="png", help="prefix of the training runs' output names")
    args = parser.parse_args()
    make_pngs(args.url, args.checkpoint, args.out_dir, args.run_prefix)


if __name__ == "__main__":
    main()
