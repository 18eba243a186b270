"""SDXL inside a real ComfyUI: the distil workflow on a random SDXL checkpoint (Segmind Vega layout, 320 wide),
1-2 iterations at the smallest resolution the nodes take, then its LoRA through the stock LoraLoader.
Skipped unless COMFYUI_ROOT is set (see conftest.py); builds a ~1.9 GB checkpoint once per session."""

import json
import os
import time

import pytest
from safetensors import safe_open
from test_server import _errors, _images, load_workflow
from train_inputs import set_train_inputs
from workflow_names import DISTIL, SAMPLE_STOCK  # this folder

RUN = "ci_sdxl"
FIGURES = {}


def _sdxl_train_graph(checkpoint: str) -> dict:
    graph = load_workflow(DISTIL)  # as shipped: guidance_scale auto (family default), uncond zeros
    graph["1"]["inputs"]["ckpt_name"] = checkpoint
    set_train_inputs(
        graph, prompts="a photo of a cat\na red house", resolution=64, max_train_steps=2, network_dim=4,
        network_alpha=4.0, learning_rate=1e-3, fake_updates_per_step=1, preview_every=1, save_every=0,
        mixed_precision="no", gradient_checkpointing=True, resume=False, preview_prompts="a photo of a cat",
        output_name=RUN)
    graph["4"]["inputs"].update(lora_name=f"{RUN}_lora", save_checkpoint=False)
    graph["11"]["inputs"].update(width=64, height=64)
    graph["14"]["inputs"]["filename_prefix"] = f"{RUN}_few_step"
    return graph


@pytest.fixture(scope="module")
def sdxl_trained(comfy_server, tiny_sdxl):
    log_start = len(comfy_server.log())
    started = time.time()
    entry = comfy_server.run(_sdxl_train_graph(tiny_sdxl), timeout=900)
    FIGURES["sdxl_distill_prompt_seconds"] = round(time.time() - started, 1)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    return entry, comfy_server.log()[log_start:]


def test_sdxl_teacher_is_detected_with_guidance_8(comfy_server, sdxl_trained):
    lora = os.path.join(comfy_server.base, "models", "loras", f"{RUN}_lora.safetensors")
    with safe_open(lora, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["decoupled_dmd.family"] == "sdxl"
    assert float(metadata["decoupled_dmd.guidance_scale"]) == 8.0
    assert metadata["decoupled_dmd.train_steps"] == "2"


def test_train_node_logs_the_memory_plan_of_the_loaded_model(sdxl_trained):
    _, log = sdxl_trained
    assert "memory plan unavailable" not in log
    plan = log[log.index("memory plan ("):]
    base = float(plan.split("base weights", 1)[1].split()[0])  # the Vega-layout UNet: ~0.7 B parameters
    assert "peak while training" in plan and "=> peak" in plan and base > 0


def test_sdxl_few_step_sampler_makes_an_image_and_lora_is_unet_only(comfy_server, sdxl_trained):
    entry, _ = sdxl_trained
    assert any(name.startswith(f"{RUN}_few_step") for name in _images(entry))
    with safe_open(os.path.join(comfy_server.base, "models", "loras", f"{RUN}_lora.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # SDXL: the LDM paths kohya's own SDXL LoRAs use
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in keys)
    # the cross-attention on the 2048-wide SDXL context is among the trained layers
    assert any("attn2_to_k" in k for k in keys)
    run_dir = os.path.join(comfy_server.base, "output", "decoupled_dmd", RUN)
    with open(os.path.join(run_dir, "logs", "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["step"] for r in records][-1] == 2
    FIGURES["sdxl_seconds_per_iteration"] = round(records[-1]["seconds_per_step"], 2)
    FIGURES["sdxl_peak_rss_mb_after_training"] = round(comfy_server.peak_rss_mb())


def test_sdxl_lora_loads_in_stock_loraloader_with_no_unloaded_keys(comfy_server, tiny_sdxl, sdxl_trained):
    graph = load_workflow(SAMPLE_STOCK)
    graph["1"]["inputs"]["ckpt_name"] = tiny_sdxl
    graph["2"]["inputs"]["lora_name"] = f"{RUN}_lora.safetensors"
    graph["4"]["inputs"].update(width=64, height=64)
    graph["7"]["inputs"]["filename_prefix"] = f"{RUN}_stock_lora"
    log_start = len(comfy_server.log())
    entry = comfy_server.run(graph, timeout=900)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    assert _images(entry)
    log = comfy_server.log()[log_start:].lower()
    assert "not loaded" not in log, log[-3000:]
    assert "not loaded" not in sdxl_trained[1].lower()  # the train node's own LoRA application (student MODEL)
    FIGURES["sdxl_peak_rss_mb"] = round(comfy_server.peak_rss_mb())
    print("\nComfyUI SDXL figures:", json.dumps(FIGURES))
