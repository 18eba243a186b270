"""The catalogue of bad inputs and faults: each is refused with a message that says what to change, before the
weights load where it can be, and nothing a user had is lost or replaced.

Classes: numbers (non-finite, absurd, out of range), file names, state folders (copied, of another run, of
other settings, finished, damaged), two runs at once, runs that learn nothing, stops, full disks, leaks.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from decoupled_dmd.trainer import api
from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.config import ConfigError, config_from_dict
from decoupled_dmd.trainer.formats import read_student_metadata
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer, TrainerCallbacks, TrainingFailed, list_states
from decoupled_dmd.trainer.outputs import FILE_MODE, LOCK_NAME, atomic_write, own_output_dir, remove_stale_staging

PROMPTS = ["a photo of the cat", "a red house"]


def settings(tmp_path, **overrides):
    values = dict(pretrained_model_name_or_path="builtin:tiny-sd15", output_dir=str(tmp_path / "out"),
                  max_train_steps=2, network_dim=4, network_alpha=4, learning_rate=1e-3, fake_updates_per_step=1,
                  log_with="none", train_batch_size=1, student_timesteps=[999, 499], resolution=64)
    values.update(overrides)
    return values


def trainer_for(tiny_model_dir, tmp_path, tiny="tiny-sd15", callbacks=None, **overrides):
    config = config_from_dict(settings(tmp_path, **overrides))
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir(tiny))
    return DecoupledDMDTrainer(config, adapter, PROMPTS, callbacks=callbacks)


def sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- numbers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, says", [
    ("learning_rate", float("inf"), "finite"), ("learning_rate", float("nan"), "finite"),
    ("learning_rate", 5.0, "beyond 1"), ("fake_learning_rate", float("-inf"), "finite"),
    ("guidance_scale", float("inf"), "finite"), ("guidance_scale", 1e6, "beyond 100"),
    ("dmd_loss_weight", float("inf"), "finite"), ("dmd_loss_weight", 1e9, "beyond"),
    ("max_grad_norm", float("nan"), "finite"), ("fake_updates_per_step", 1000, "beyond 100"),
    ("network_alpha", float("inf"), "finite"), ("network_dim", 100000, "beyond"),
    ("seed", -1, "0 .. 4294967295"), ("seed", 2**32, "0 .. 4294967295"),
    ("max_nonfinite_updates", 0, "> 0"), ("network_alpha", 65, "beyond 16 x network_dim (4)"),
])
def test_non_finite_or_absurd_numbers_are_refused_by_name(tmp_path, key, value, says):
    with pytest.raises(ConfigError, match=key) as error:
        config_from_dict(settings(tmp_path, **{key: value}))
    assert says in str(error.value)


@pytest.mark.parametrize("name, says", [
    ("a/b", "no folders"), ("..\\..\\evil", "no folders"), ("C:evil", "':'"), ("bad\x00name", "control"),
    ("CON", "reserved"), ("lpt1.backup", "reserved"), ("trailing.", "end with a dot"), (" lead", "space"),
    ("x" * 300, "bytes"), ("..", "cannot be . or .."), ("", "empty"),
])
def test_output_names_must_be_valid_on_every_os(tmp_path, name, says):
    with pytest.raises(ConfigError, match="output_name") as error:
        config_from_dict(settings(tmp_path, output_name=name))
    assert says in str(error.value)


def test_node_file_names_are_checked_part_by_part():
    from decoupled_dmd.nodes.runtime import check_file_name

    assert check_file_name("styles/my_student") == "styles/my_student.safetensors"
    for bad in ("styles/CON", "a/" + "x" * 300, "..\\x", "C:/x", "nul\x00"):
        with pytest.raises(ValueError):
            check_file_name(bad)


# --- checks before loading ------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad setting was found")

    monkeypatch.setattr(api, "load_teacher", refuse)
    monkeypatch.setattr(api, "plan_memory", refuse)


@pytest.mark.parametrize("teacher, says", [
    ("/nonexistent/models/sdxl_finetune", "does not exist"), ("./my_model", "does not exist"),
    ("models\\sdxl.safetensors", "does not exist"), ("missing.safetensors", "does not exist"),
    ("old.ckpt", "pickled checkpoint"),
])
def test_a_missing_teacher_path_is_never_tried_as_a_hub_id(tmp_path, prompt_file, no_loading, teacher, says):
    config = config_from_dict(settings(tmp_path, pretrained_model_name_or_path=teacher, prompt_file=prompt_file))
    with pytest.raises(ConfigError, match=says):
        api.distill(config)


def test_precision_and_output_folder_are_checked_before_loading(tmp_path, prompt_file, no_loading):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            api.distill(config_from_dict(settings(tmp_path, mixed_precision="fp16", prompt_file=prompt_file)))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "below"):
        with pytest.raises(ConfigError, match="cannot be used"):
            api.distill(config_from_dict(settings(tmp_path, output_dir=str(folder), prompt_file=prompt_file)))


def test_student_timesteps_beyond_a_checkpoints_range_fail_from_its_header(tmp_path, prompt_file, ldm_checkpoint,
                                                                           no_loading):
    config = config_from_dict(settings(tmp_path, pretrained_model_name_or_path=ldm_checkpoint("tiny-sd15"),
                                       student_timesteps=[1500, 500], prompt_file=prompt_file))
    with pytest.raises(ConfigError, match="1500"):
        api.distill(config)


def test_resume_path_that_does_not_exist_fails_before_loading(tmp_path, prompt_file, no_loading):
    for where, says in ((tmp_path / "nope", "does not exist"), (tmp_path, "not a training state folder")):
        config = config_from_dict(settings(tmp_path, resume=str(where), prompt_file=prompt_file))
        with pytest.raises(ConfigError, match=says):
            api.distill(config)


# --- state folders --------------------------------------------------------------------------------------------
def test_a_copied_run_folder_resumes_into_itself_and_leaves_the_original_alone(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path).train()
    original = tmp_path / "out" / "dmd_student.safetensors"
    before = sha(original)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    resumed = trainer_for(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "copy"), resume="latest",
                          max_train_steps=3)
    path = resumed.train()
    assert path == str(tmp_path / "copy" / "dmd_student.safetensors")
    assert read_student_metadata(path)["decoupled_dmd.train_steps"] == "3"
    assert sha(original) == before
    record = json.load(open(os.path.join(list_states(str(tmp_path / "copy"))[-1], "trainer_state.json")))
    assert record["output_paths"] == {"student": "dmd_student.safetensors",
                                      "checkpoint": "dmd_student_checkpoint.safetensors"}


@pytest.mark.parametrize("change, says", [
    ({"network_dim": 8}, "network_dim: state 4, now 8"),
    ({"learning_rate": 1e-4}, "optimiser"),
    ({"guidance_scale": 3.0}, "resume_changed_settings"),
    ({"student_timesteps": [999, 249]}, "student_timesteps"),
])
def test_resume_with_other_settings_is_refused_before_training(tiny_model_dir, tmp_path, change, says):
    trainer_for(tiny_model_dir, tmp_path).train()
    states = list_states(str(tmp_path / "out"))
    trainer = trainer_for(tiny_model_dir, tmp_path, resume="latest", max_train_steps=4, **change)
    with pytest.raises(ConfigError, match=says):
        trainer.train()
    assert list_states(str(tmp_path / "out")) == states and trainer.step == 0


def test_changed_method_settings_continue_when_asked(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path).train()
    trainer = trainer_for(tiny_model_dir, tmp_path, resume="latest", max_train_steps=3, guidance_scale=3.0,
                          resume_changed_settings=True)
    trainer.train()
    assert trainer.step == 3
    with pytest.raises(ConfigError, match="network_dim"):  # what the weights hold never changes within a run
        trainer_for(tiny_model_dir, tmp_path, resume="latest", max_train_steps=5, network_dim=8,
                    resume_changed_settings=True).train()


def test_resume_with_another_teacher_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    trainer_for(tiny_model_dir, tmp_path).train()
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_model_dir("tiny-sd15"), retrained)
    weights = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] += 0.01
    save_file(tensors, weights)
    config = config_from_dict(settings(tmp_path, resume="latest", max_train_steps=4))
    other = DecoupledDMDTrainer(config, DiffusersAdapter.from_pretrained(str(retrained)), PROMPTS)
    with pytest.raises(ConfigError, match="sha256"):
        other.train()
    v_prediction = trainer_for(tiny_model_dir, tmp_path, tiny="tiny-sd15-v", resume="latest", max_train_steps=4)
    with pytest.raises(ConfigError, match="predicts epsilon"):
        v_prediction.train()
    sdxl = trainer_for(tiny_model_dir, tmp_path, tiny="tiny-sdxl", resume="latest", max_train_steps=4)
    with pytest.raises(ConfigError, match="sd15 model"):
        sdxl.train()


def test_a_finished_run_is_never_silently_resumed(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path).train()
    student = tmp_path / "out" / "dmd_student.safetensors"
    before = sha(student)
    with pytest.raises(ConfigError, match="already finished"):
        trainer_for(tiny_model_dir, tmp_path, resume="latest").train()
    assert sha(student) == before


def test_a_fresh_run_never_replaces_another_runs_states(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path).train()
    states = list_states(str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="another run's states"):
        trainer_for(tiny_model_dir, tmp_path, seed=7).train()
    assert list_states(str(tmp_path / "out")) == states


def test_a_damaged_or_edited_state_is_refused(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path, max_train_steps=1).train()
    marker = os.path.join(list_states(str(tmp_path / "out"))[-1], "trainer_state.json")
    record = json.load(open(marker))
    record["output_paths"]["student"] = "..\\..\\escape.safetensors"
    json.dump(record, open(marker, "w"))
    with pytest.raises(ConfigError, match="not a plain .safetensors name"):
        trainer_for(tiny_model_dir, tmp_path, resume="latest", max_train_steps=2).train()
    open(marker, "w").write("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        trainer_for(tiny_model_dir, tmp_path, resume="latest", max_train_steps=2).train()


# --- two runs at once -----------------------------------------------------------------------------------------
def test_one_run_owns_an_output_folder(tiny_model_dir, tmp_path):
    folder = str(tmp_path / "out")
    with own_output_dir(folder):
        with own_output_dir(folder):  # re-entrant within one run (the API holds it while the trainer runs)
            assert os.path.isfile(os.path.join(folder, LOCK_NAME))
    assert not os.path.exists(os.path.join(folder, LOCK_NAME))  # no litter once the run ends

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from decoupled_dmd.trainer.outputs import own_output_dir\n"
         "with own_output_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", folder],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"in use by another run \(pid \d+"):
            trainer_for(tiny_model_dir, tmp_path).train()
    finally:
        holder.kill()  # a crash: the OS drops the lock, nothing stays stuck
        holder.wait()
    assert trainer_for(tiny_model_dir, tmp_path, max_train_steps=1).train()


# --- runs that learn nothing ----------------------------------------------------------------------------------
def test_a_teacher_with_nan_weights_is_refused(tiny_model_dir, tmp_path):
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    with torch.no_grad():
        next(adapter.network.parameters()).view(-1)[3] = float("nan")
    with pytest.raises(ConfigError, match="NaN or inf"):
        DecoupledDMDTrainer(config_from_dict(settings(tmp_path)), adapter, PROMPTS)


def poison(trainer):
    """NaN inside the student's LoRA: every gradient from then on is non-finite."""
    with torch.no_grad():
        for name, parameter in trainer.adapter.network.named_parameters():
            if "lora_A.student" in name:
                parameter.fill_(float("nan"))
                return


def test_repeated_non_finite_updates_stop_the_run_and_keep_the_last_good_state(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, max_train_steps=20, save_every_n_steps=1,
                          max_nonfinite_updates=3)
    original_step = trainer.train_step

    def step_then_poison():
        if trainer.step == 2:  # after step 2 was saved
            poison(trainer)
        return original_step()

    trainer.train_step = step_then_poison
    with pytest.raises(TrainingFailed, match="3 updates in a row") as error:
        trainer.train()
    assert "state-000002" in str(error.value) and "learning rate" in str(error.value)
    assert trainer.step == 5
    assert [os.path.basename(p) for p in list_states(str(tmp_path / "out"))] == ["state-000001", "state-000002"]
    assert read_student_metadata(str(tmp_path / "out" / "dmd_student.safetensors"))["decoupled_dmd.train_steps"] == "2"


def test_a_run_with_no_successful_update_writes_no_student_and_fails(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, max_train_steps=2, network_alpha=32)  # alpha / dim = 8
    poison(trainer)
    with pytest.raises(TrainingFailed, match="0 succeeded") as error:
        trainer.train()
    assert "network_alpha 32 over network_dim 4 (every LoRA update scaled 8x)" in str(error.value)
    assert not (tmp_path / "out" / "dmd_student.safetensors").exists()
    assert list_states(str(tmp_path / "out")) == []


def test_a_stop_before_the_first_update_writes_nothing(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, callbacks=TrainerCallbacks(should_stop=lambda: True))
    assert trainer.train() is None
    assert not (tmp_path / "out").exists()  # not even an empty folder


# --- full disks, litter, leaks --------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     Exception("I/O error: No space left on device (os error 28)")])
def test_disk_full_is_a_clear_message_and_leaves_nothing(tmp_path, failure):
    def write(staging):
        open(staging, "wb").write(b"partial")
        raise failure

    with pytest.raises(OSError, match="disk full while writing") as error:
        atomic_write(str(tmp_path / "student.safetensors"), write)
    assert error.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_disk_full_during_a_state_save_keeps_the_last_good_state(tiny_model_dir, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_model_dir, tmp_path, max_train_steps=3, save_every_n_steps=1)
    save = trainer.accelerator.save_state

    def fill_disk_at_step_2(folder, *args, **kwargs):
        save(folder, *args, **kwargs)
        if trainer.step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.accelerator, "save_state", fill_disk_at_step_2)
    with pytest.raises(OSError, match="last good state is .*state-000001"):
        trainer.train()
    assert [os.path.basename(p) for p in list_states(str(tmp_path / "out"))] == ["state-000001"]
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]


def test_files_get_normal_permissions_and_temporaries_are_invisible_to_loaders(tmp_path):
    path = atomic_write(str(tmp_path / "a.safetensors"), lambda staging: open(staging, "wb").write(b"x"))
    assert os.stat(path).st_mode & 0o777 == FILE_MODE != 0o600
    stale = tmp_path / ".partial-abc123.safetensors.tmp"
    stale.write_bytes(b"left by a killed run")
    assert not stale.name.endswith((".safetensors", ".ckpt", ".pt", ".png"))
    assert remove_stale_staging(str(tmp_path)) == [stale.name] and not stale.exists()


def test_student_metadata_holds_no_local_paths(tiny_model_dir, tmp_path, prompt_file):
    config = config_from_dict(settings(tmp_path, pretrained_model_name_or_path=tiny_model_dir("tiny-sd15"),
                                       prompt_file=prompt_file, max_train_steps=1))
    path = api.distill(config)
    metadata = read_student_metadata(path)
    leaks = {k: v for k, v in metadata.items() if str(tmp_path) in v or os.path.expanduser("~") + os.sep in v}
    assert not leaks
    assert 'prompt_file = "prompts.txt"' in metadata["decoupled_dmd.config"]


# --- dmd-sample checks everything it reads --------------------------------------------------------------------
@pytest.fixture
def student_file(tiny_model_dir, tmp_path):
    trainer_for(tiny_model_dir, tmp_path, max_train_steps=1).train()
    return str(tmp_path / "out" / "dmd_student.safetensors")


def sample_fails(argv, capsys, says):
    from decoupled_dmd.trainer.cli import sample_main

    with pytest.raises(SystemExit) as exit_:
        sample_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err[-2000:]


def test_dmd_sample_refuses_bad_flags_before_loading(tiny_model_dir, tmp_path, student_file, capsys, monkeypatch):
    monkeypatch.setattr(api, "load_teacher", lambda *a, **k: pytest.fail("loaded before the bad flag was found"))
    model = tiny_model_dir("tiny-sd15")
    base = ["--model", model, "--student", student_file, "--prompt", "a red house"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for extra, says in ((["--timesteps", "249,499"], "strictly decreasing"), (["--timesteps", "-5"], "non-negative"),
                        (["--timesteps", "9x"], "whole numbers"), (["--timesteps", "999,999"], "strictly decreasing"),
                        (["--teacher_steps", "0"], "--teacher_steps 0"),
                        (["--guidance_scale", "nan"], "--guidance_scale nan"),
                        (["--seed", "-1"], "--seed -1"), (["--resolution", "13"], "multiples of 8"),
                        (["--output", str(blocker / "x.png")], "cannot write there"),
                        (["--output", str(tmp_path / "grid.jpg")], "write a .png file name"),
                        (["--output", str(tmp_path / "CON.png")], "reserved")):
        sample_fails(base + extra, capsys, says)
    sample_fails(["--model", "/nonexistent/sdxl", "--prompt", "x"], capsys,
                 "--model: '/nonexistent/sdxl' does not exist")


def test_dmd_sample_refuses_damaged_metadata_and_foreign_students(tiny_model_dir, tmp_path, student_file, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(student_file, "pt") as handle:
        metadata = handle.metadata()
    for key, value, says in (("decoupled_dmd.student_timesteps", "[oops", "unusable"),
                             ("decoupled_dmd.student_timesteps", "[249, 999]", "strictly decreasing"),
                             ("decoupled_dmd.format", "zip", "not lora, unet or checkpoint")):
        damaged = tmp_path / "damaged.safetensors"
        save_file(load_file(student_file), str(damaged), metadata={**metadata, key: value})
        sample_fails(["--model", tiny_model_dir("tiny-sd15"), "--student", str(damaged), "--prompt", "x",
                      "--output", str(tmp_path / "s.png")], capsys, says)
    sample_fails(["--model", tiny_model_dir("tiny-sdxl"), "--student", student_file, "--prompt", "x",
                  "--output", str(tmp_path / "s.png")], capsys, "student of a sd15 model")
    sample_fails(["--model", tiny_model_dir("tiny-sd15"), "--student", student_file, "--timesteps", "1500,500",
                  "--prompt", "x", "--output", str(tmp_path / "s.png")], capsys, "outside this model's range")
    assert not (tmp_path / "s.png").exists()


def test_lora_targets_that_match_nothing_fail_before_loading(tmp_path, prompt_file, monkeypatch):
    monkeypatch.setattr(api, "load_teacher", lambda *a, **k: pytest.fail("loaded before the targets were checked"))
    config = config_from_dict(settings(tmp_path, prompt_file=prompt_file, lora_target_modules=["to_q", "to_qq"]))
    with pytest.raises(ConfigError, match=r"'to_qq' \(did you mean 'to_q'"):
        api.distill(config)


# --- damaged checkpoints --------------------------------------------------------------------------------------
def _damaged(ldm_checkpoint, tmp_path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ldm_checkpoint("tiny-sdxl"))
    change(tensors)
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path))
    return str(path)


def _first(tensors, prefix, suffix=".weight"):
    return next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(suffix))


@pytest.mark.parametrize("what", ["no CLIP-L tensor", "no OpenCLIP tensor", "no VAE tensor", "misshapen VAE",
                                  "misshapen CLIP", "integer UNet weight"])
def test_checkpoints_damaged_anywhere_get_one_line(tiny_model_dir, ldm_checkpoint, tmp_path, what):
    from decoupled_dmd.trainer import ldm_layout as layout
    from decoupled_dmd.trainer.adapters.single_file import load_single_file
    from decoupled_dmd.trainer.formats import CheckpointError

    def change(tensors):
        if what == "no CLIP-L tensor":
            del tensors[_first(tensors, layout.SDXL_CLIP_L_PREFIX)]
        elif what == "no OpenCLIP tensor":
            del tensors[_first(tensors, layout.SDXL_CLIP_G_PREFIX)]
        elif what == "no VAE tensor":
            del tensors[_first(tensors, layout.VAE_PREFIX + "decoder.")]
        elif what == "misshapen VAE":
            key = _first(tensors, layout.VAE_PREFIX + "decoder.")
            tensors[key] = torch.zeros(3, *tensors[key].shape[1:], dtype=tensors[key].dtype)
        elif what == "misshapen CLIP":
            key = _first(tensors, layout.SDXL_CLIP_L_PREFIX, "fc1.weight")
            tensors[key] = tensors[key][:-1]
        else:
            key = _first(tensors, layout.UNET_PREFIX + "out.")
            tensors[key] = tensors[key].to(torch.int16)

    path = _damaged(ldm_checkpoint, tmp_path, change)
    with pytest.raises(CheckpointError) as error:
        load_single_file(path, tokenizer_path=os.path.join(tiny_model_dir("tiny-sdxl"), "tokenizer"))
    message = str(error.value)
    assert "damaged" in message and "damaged.safetensors" in message and "\n" not in message


@pytest.mark.parametrize("header, says", [
    ("[" * 200_000 + "]" * 200_000, "not a safetensors file"),
    ('{"w": {"shape": [2], "data_offsets": [0, 8]}}', "no known dtype"),
    ('{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "shape"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "data_offsets"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}', "data_offsets"),
    ('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', "8 bytes for a F32 tensor of shape [4]"),
    ('{"__metadata__": {"k": 3}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "table of strings"),
])
def test_crafted_headers_are_refused_by_name(tmp_path, header, says):
    import struct

    from decoupled_dmd.trainer.formats import CheckpointError, inspect_checkpoint

    encoded = header.encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(8))
    with pytest.raises(CheckpointError) as error:
        inspect_checkpoint(str(path))
    assert says in str(error.value)


@pytest.mark.parametrize("content, says", [("a cat\n".encode("utf-16"), "not UTF-8"),
                                           (b"a cat\n\xff\xfe red", "not UTF-8"), (b"a\x00b\n", "NUL bytes")])
def test_prompt_files_that_are_not_utf8_text_are_refused(tmp_path, content, says):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says):
        api.read_prompts(str(path))
    path.write_bytes("\ufeffa cat\n# skip\nune crêpe\n".encode("utf-8"))
    assert api.read_prompts(str(path)) == ["a cat", "une crêpe"]


def test_a_missing_relative_model_or_an_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("models/not_here", "some-org/some-model"):
        with pytest.raises(ConfigError, match="no local file or folder here"):
            api.load_teacher(name)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        api.load_teacher("empty_folder")


def test_builtin_typos_and_timestep_bounds_beyond_the_schedule_fail_before_loading(tmp_path, prompt_file,
                                                                                   tiny_model_dir, no_loading):
    with pytest.raises(ConfigError, match="did you mean 'builtin:tiny-sd15'"):
        config_from_dict(settings(tmp_path, pretrained_model_name_or_path="builtin:tiny-sd16"))
    folder = tiny_model_dir("tiny-sd15")  # a diffusers folder: the range comes from its scheduler config
    for change, says in (({"max_timestep": 5000}, "beyond this model's last timestep 999"),
                         ({"student_timesteps": [1200, 500]}, "outside this model's range")):
        config = config_from_dict(settings(tmp_path, pretrained_model_name_or_path=folder, prompt_file=prompt_file,
                                           **change))
        with pytest.raises(ConfigError, match=says):
            api.distill(config)


def test_a_damaged_diffusers_folder_is_one_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "damaged_model"
    shutil.copytree(tiny_model_dir("tiny-sd15"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="cannot be loaded") as error:
        api.load_teacher(str(folder))
    assert "\n" not in str(error.value) and "damaged_model" in str(error.value)


def test_the_run_says_what_it_is_doing_and_whether_it_continues(tiny_model_dir, tmp_path):
    said = []
    callbacks = TrainerCallbacks(on_phase=said.append)
    trainer_for(tiny_model_dir, tmp_path, callbacks=callbacks).train()
    assert any(t.startswith("encoding ") for t in said) and any("adding the student" in t for t in said)
    assert said[-1].startswith("starting a fresh run")
    said.clear()
    trainer_for(tiny_model_dir, tmp_path, callbacks=callbacks, resume="latest", max_train_steps=3).train()
    assert said[-1].startswith("continuing the run") and said[-1].endswith("at step 2 of 3")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_sigterm_saves_a_state_exits_143_and_the_run_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    """What machines send (docker stop, Slurm, a cloud instance going away) is handled like the first Ctrl-C:
    the update finishes, a resumable state is saved, the exit code is 128 + 15; resuming it to step k + 2 gives
    the student a straight run of k + 2 steps gives."""
    import signal
    import time

    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def command(out, *extra):
        return [sys.executable, "-c", "import sys; from decoupled_dmd.trainer.cli import distill_main; "
                "sys.exit(distill_main(sys.argv[1:]))", "--pretrained_model_name_or_path", tiny_model_dir("tiny-sd15"),
                "--prompt_file", str(prompts), "--output_dir", str(out), "--log_with", "none", "--network_dim", "4",
                "--fake_updates_per_step", "1", "--train_batch_size", "1", "--student_timesteps", "999,499", *extra]

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command(tmp_path / "stopped", "--max_train_steps", "100000"), env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped" / "logs" / "metrics.jsonl"
    started = time.time()
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.time() - started < 240:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr
    state = list_states(str(tmp_path / "stopped"))[-1]
    done = int(state.rsplit("-", 1)[1])
    assert done >= 2

    resumed = subprocess.run(command(tmp_path / "stopped", "--max_train_steps", str(done + 2), "--resume", state),
                             env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(command(tmp_path / "straight", "--max_train_steps", str(done + 2)), env=environment,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(str(tmp_path / "stopped" / "dmd_student.safetensors"))
    b = load_file(str(tmp_path / "straight" / "dmd_student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_metrics_log_is_strict_json_and_state_files_are_not_private(tiny_model_dir, tmp_path):
    """NaN and Infinity are not JSON (browsers, jq and pandas reject them): a non-finite value is logged as null
    and every reader copes; a state's files get the modes open() gives (0644 under the usual umask), not 0600."""
    import math

    from decoupled_dmd.trainer.curves import curves_image
    from decoupled_dmd.trainer.outputs import metrics_line

    line = metrics_line({"step": 3, "loss_generator": math.nan, "grad_norm_student": math.inf, "gen_std": 0.5})
    assert json.loads(line) == {"step": 3, "loss_generator": None, "grad_norm_student": None, "gen_std": 0.5}
    assert "NaN" not in line and "Infinity" not in line
    records = [json.loads(line), {"step": 4, "loss_generator": 1.0, "grad_norm_student": 2.0, "gen_std": None}]
    assert curves_image(records).size[0] > 0  # nulls are gaps, not a crash
    from decoupled_dmd.demo.plots import save_training_curves

    save_training_curves(records, str(tmp_path / "curves.png"))

    trainer = trainer_for(tiny_model_dir, tmp_path, max_train_steps=1)
    trainer.train()
    state = list_states(str(tmp_path / "out"))[-1]
    for root, _folders, files in os.walk(state):
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == FILE_MODE, name
    with open(tmp_path / "out" / "logs" / "metrics.jsonl", encoding="utf-8") as handle:
        for text in handle:
            json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_folders_where_files_belong_and_invisible_prompts_are_named_before_loading(tmp_path, no_loading):
    folder = tmp_path / "prompts_folder"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder; give a text file"):
        api.distill(config_from_dict(settings(tmp_path, prompt_file=str(folder))))
    invisible = tmp_path / "invisible.txt"
    invisible.write_text("\u200b\n\ufeff \u200d\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompts"):
        api.distill(config_from_dict(settings(tmp_path, prompt_file=str(invisible))))
    assert api.prompt_lines("a cat\u200b\n\u200b\u2060\n  \u3000 \nred house") == ["a cat\u200b", "red house"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n")
    named = tmp_path / "model.safetensors"
    named.mkdir()
    with pytest.raises(ConfigError, match="is a folder named like a checkpoint file"):
        api.distill(config_from_dict(settings(tmp_path, pretrained_model_name_or_path=str(named),
                                              prompt_file=str(prompts))))
    with pytest.raises(ConfigError, match="network_weights: .* is a folder"):
        api.distill(config_from_dict(settings(tmp_path, network_weights=str(named), prompt_file=str(prompts))))


def test_a_config_error_is_one_line_and_a_pointer_to_help_not_the_usage_block(tmp_path):
    for argv, says in ((["--student_timesteps", "[249, 499]"], "strictly decreasing"),
                       (["--student_timesteps", "999,,499"], "empty entry"), (["--no_such_flag"], "unrecognized")):
        result = subprocess.run([sys.executable, "-m", "decoupled_dmd.trainer.cli", *argv], capture_output=True,
                                text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and says in result.stderr
        assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) == 2, result.stderr
        assert "--help lists every option" in result.stderr


def test_diffusers_empty_float32_list_warning_is_not_shown(tiny_model_dir):
    """'There are modules in UNet2DConditionModel that should be kept in float32: []' came twice a run."""
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    source = logging.getLogger("diffusers.models.modeling_utils")  # diffusers does not propagate to the root
    source.addHandler(handler)
    try:
        adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
        adapter.network.to(dtype=torch.bfloat16)
        source.warning("should be kept in float32: ['norm']")
    finally:
        source.removeHandler(handler)
    assert not any("kept in float32: []" in m for m in seen) and any("float32: ['norm']" in m for m in seen)


def test_dmd_sample_refuses_a_student_on_another_base_unless_forced(tiny_model_dir, tmp_path, student_file, capsys):
    """The student's metadata records its base's sha256: on other weights of the same family (here the tiny
    teacher with one weight changed) it is refused with what to do; --force applies it anyway."""
    from safetensors.torch import load_file, save_file

    from decoupled_dmd.trainer.cli import sample_main

    other = tmp_path / "other_base"
    shutil.copytree(tiny_model_dir("tiny-sd15"), other)
    unet = next(p for p in (other / "unet").iterdir() if p.suffix == ".safetensors")
    weights = load_file(str(unet))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(unet))
    argv = ["--model", str(other), "--student", student_file, "--prompt", "x", "--output", str(tmp_path / "s.png")]
    sample_fails(argv, capsys, "was distilled from")
    assert not (tmp_path / "s.png").exists()
    assert sample_main(argv + ["--force"]) == 0 and (tmp_path / "s.png").is_file()
    assert sample_main(["--model", tiny_model_dir("tiny-sd15"), "--student", student_file, "--prompt", "x",
                        "--output", str(tmp_path / "own.png")]) == 0  # its own base: no question asked


def test_torchs_failed_stream_on_a_full_disk_is_named_disk_full(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as 'basic_ios::clear' or 'unexpected pos': with (almost) no free space
    left that is a full disk, named like ENOSPC, the last good state kept; dmd-sample says it without a
    traceback. With space left the error is not disguised."""
    import collections

    from decoupled_dmd.trainer import outputs
    from decoupled_dmd.trainer.cli import sample_main

    usage = collections.namedtuple("usage", "total used free")
    torch_failure = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4608 vs 4500")
    assert not outputs.is_disk_full(torch_failure, str(tmp_path))  # this disk has room: another fault
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 0))
    assert outputs.is_disk_full(torch_failure, str(tmp_path)) and not outputs.is_disk_full(torch_failure)

    trainer = trainer_for(tiny_model_dir, tmp_path, max_train_steps=3, save_every_n_steps=1)
    save = trainer.accelerator.save_state

    def fail_at_step_2(folder, *args, **kwargs):
        save(folder, *args, **kwargs)
        if trainer.step == 2:
            raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(trainer.accelerator, "save_state", fail_at_step_2)
    with pytest.raises(OSError, match="disk full while writing .*last good state is .*state-000001"):
        trainer.train()

    def full(images, path, columns=None):
        raise outputs.disk_full_error(path, "nothing was written under that name")

    monkeypatch.setattr(outputs, "save_image_grid", full)
    code = sample_main(["--model", tiny_model_dir("tiny-sd15"), "--teacher_steps", "2", "--prompt", "x",
                        "--output", str(tmp_path / "grid.png")])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err and not (tmp_path / "grid.png").exists()
