"""The console scripts end to end: dmd-distill from a TOML file, then dmd-sample on what it wrote."""

import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd):
    result = subprocess.run([sys.executable, "-c", "import sys; from decoupled_dmd.trainer.cli import "
                             f"{args[0]} as main; sys.exit(main(sys.argv[1:]))", *args[1:]],
                            capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_distill_then_sample(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the cat\na red house\n")
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_model_dir('tiny-sd15')}"
prompt_file = "{prompts}"
output_dir = "{tmp_path / 'out'}"
log_with = "none"
[method]
student_timesteps = [999, 499]
fake_updates_per_step = 1
[training]
network_dim = 4
max_train_steps = 2
""")
    run(["distill_main", "--config", str(config), "--max_train_steps", "3"], tmp_path)
    student = tmp_path / "out" / "dmd_student.safetensors"
    assert student.is_file()
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == ["step_000003.png"]

    grid = tmp_path / "grid.png"
    result = run(["sample_main", "--model", tiny_model_dir("tiny-sd15"), "--student", str(student),
                  "--prompt", "a red house", "--prompt", "the cat", "--output", str(grid)], tmp_path)
    assert result.stdout.strip() == str(grid)
    assert Image.open(grid).size == (32, 16)  # two 16 px images side by side
    teacher = tmp_path / "teacher.png"
    run(["sample_main", "--model", tiny_model_dir("tiny-sd15"), "--teacher_steps", "4", "--prompt", "a red house",
         "--output", str(teacher)], tmp_path)
    assert Image.open(teacher).size == (16, 16)


def test_print_config_shows_defaults_and_overrides(tmp_path):
    result = run(["distill_main", "--print_config", "--network_dim", "16"], tmp_path)
    assert "network_dim = 16" in result.stdout
    assert 'renoise_schedule = "decoupled-hybrid"' in result.stdout


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "decoupled_dmd.trainer.cli", "--pretrained_model_name_or_path",
                             "builtin:tiny-sd15", "--prompt_file", str(tmp_path / "nope.txt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "prompt_file:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_pack_imports_as_a_comfyui_custom_node_folder(tmp_path):
    """ComfyUI loads custom_nodes/<folder>/__init__.py under the folder's name, beside its own `nodes` module."""
    code = ("import importlib.util, sys, types; sys.modules['nodes'] = types.ModuleType('nodes');"
            f"spec = importlib.util.spec_from_file_location('ComfyUI-DecoupledDMD', r'{ROOT}/__init__.py',"
            f" submodule_search_locations=[r'{ROOT}']);"
            "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module;"
            "spec.loader.exec_module(module); print(type(module.NODE_CLASS_MAPPINGS).__name__);"
            "print(any(m.startswith('comfy') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dict", "False"]


def test_distill_a_single_file_checkpoint_then_sample_merged_and_base_plus_lora(tiny_model_dir, ldm_checkpoint,
                                                                               tmp_path):
    import numpy as np

    checkpoint = ldm_checkpoint("tiny-sd15")
    tokenizer = os.path.join(tiny_model_dir("tiny-sd15"), "tokenizer")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the cat\na red house\n")
    out = tmp_path / "out"
    run(["distill_main", "--pretrained_model_name_or_path", checkpoint, "--tokenizer_path", tokenizer,
         "--prompt_file", str(prompts), "--output_dir", str(out), "--output_name", "cat_dmd2",
         "--student_timesteps", "999,499", "--max_train_steps", "2", "--network_dim", "4", "--resolution", "64",
         "--fake_updates_per_step", "1", "--log_with", "none", "--save_merged_checkpoint", "true"], tmp_path)
    lora, merged = out / "cat_dmd2.safetensors", out / "cat_dmd2_checkpoint.safetensors"
    assert lora.is_file() and merged.is_file()

    common = ["--tokenizer_path", tokenizer, "--prompt", "a red house", "--resolution", "64", "--seed", "5"]
    run(["sample_main", "--model", str(merged), "--output", str(tmp_path / "merged.png"), *common], tmp_path)
    run(["sample_main", "--model", checkpoint, "--student", str(lora), "--output", str(tmp_path / "lora.png"),
         *common], tmp_path)
    a = np.asarray(Image.open(tmp_path / "merged.png"), dtype=np.float32)
    b = np.asarray(Image.open(tmp_path / "lora.png"), dtype=np.float32)
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 6  # same student by two routes; fp16 rounding moves a few 8-bit levels at most

    result = subprocess.run([sys.executable, "-m", "decoupled_dmd.trainer.cli", "--pretrained_model_name_or_path",
                             str(tmp_path / "model.ckpt"), "--prompt_file", str(prompts)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 2 and "only .safetensors files are read" in result.stderr


def test_help_shows_every_default_and_choice_and_the_builtin_models_the_readme_lists():
    import re

    from decoupled_dmd.trainer import builtins
    from decoupled_dmd.trainer.cli import _distill_parser
    from decoupled_dmd.trainer.config import KEYS

    text = " ".join(_distill_parser().format_help().split())
    assert "--renoise_schedule VALUE Re-noise levels" in text
    assert ("One of: coupled-shared, decoupled-full, decoupled-constrained, decoupled-hybrid. "
            "Default: \"decoupled-hybrid\"") in text
    assert "--network_dim VALUE LoRA rank (DMD2 SDXL: 64). Default: 64." in text
    assert text.count("Default:") == len(KEYS)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    listed = set(re.findall(r"builtin:([a-z0-9-]+)", readme))
    assert set(builtins.names()) <= listed <= set(builtins.accepted())  # every one; old names only as such
    assert builtins.names()[:2] == ("mnist", "texture")  # registered by the demo, ahead of the tiny models
    assert all(f"builtin:{m}" in text for m in builtins.names())
