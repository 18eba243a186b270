"""Data parallelism through accelerate: two CPU processes (DDP over gloo) end with identical adapters.

accelerate 1.x starts a single process for `--cpu --num_processes 2` unless MPI is installed; its torchrun
launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1 runs real multi-process CPU training.
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_two_processes_stay_in_sync(tiny_model_dir, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29517", worker, tiny_model_dir("tiny-sd15"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(info["num_processes"] == 2 and info["finite"] for info in infos)
    assert len(infos[0]["losses"]) == 3
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"
    trained = [k for k in ranks[0] if k.startswith("student/") and "lora_B" in k]
    assert any(ranks[0][k].abs().sum() > 0 for k in trained), "the student did not move"
