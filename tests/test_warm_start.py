"""network_weights: the student starts as the base plus a LoRA file a creator has (kohya, diffusers/peft or
ComfyUI layout), checked against the same LoRA merged into the weights by hand."""

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.adapters.single_file import load_single_file
from decoupled_dmd.trainer.api import read_student_metadata
from decoupled_dmd.trainer.config import ConfigError, config_from_dict
from decoupled_dmd.trainer.formats import CheckpointError, file_sha256, lora_module_names
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer

PROMPTS = ["a photo of the cat", "a red house"]


def settings(tmp_path, lora_path, **overrides):
    values = dict(pretrained_model_name_or_path="unused", output_dir=str(tmp_path / "out"), max_train_steps=1,
                  network_dim=8, network_alpha=4, fake_updates_per_step=1, log_with="none", train_batch_size=2,
                  student_timesteps=[999, 499], network_weights=str(lora_path), learning_rate=1e-4)
    values.update(overrides)
    return config_from_dict(values)


def pick_modules(adapter):
    """Two attention projections, a feed-forward layer, a 3x3 convolution and the time embedding (a layer outside
    the default targets)."""
    names = [n for n, m in adapter.network.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [next(n for n in names if n.endswith("attn1.to_q")), next(n for n in names if n.endswith("attn2.to_k")),
            next(n for n in names if n.endswith("ff.net.2")), next(n for n in names if n.endswith("resnets.0.conv1")),
            "time_embedding.linear_1"]


def random_lora(adapter, modules, ranks, alphas, seed=0):
    """{module: (down, up, alpha)} with shapes of each layer (conv: down k x k, up 1 x 1, as kohya writes)."""
    generator = torch.Generator().manual_seed(seed)
    layers = dict(adapter.network.named_modules())
    lora = {}
    for module, rank, alpha in zip(modules, ranks, alphas):
        weight = layers[module].weight
        if weight.ndim == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
        lora[module] = (down, up, alpha)
    return lora


def merged_by_hand(adapter, lora):
    """The independent route: W + (alpha / rank) * up @ down, written into a copy of the backbone."""
    network = copy.deepcopy(adapter.network)
    layers = dict(network.named_modules())
    with torch.no_grad():
        for module, (down, up, alpha) in lora.items():
            weight = layers[module].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += alpha / down.shape[0] * delta
    return network


def x0(adapter, network, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape(64, 64), generator=generator)
    level = torch.tensor([0.3, 0.8], dtype=torch.float64)
    with torch.no_grad():
        return adapter.predict_x0(network, x, level, adapter.encode_prompts(PROMPTS))


@pytest.fixture
def sdxl_from_file(ldm_checkpoint, tiny_model_dir):
    def load():
        return load_single_file(ldm_checkpoint("tiny-sdxl", torch.float32),
                                tokenizer_path=os.path.join(tiny_model_dir("tiny-sdxl"), "tokenizer"))
    return load


def write(path, lora, layout, adapter):
    ldm = lora_module_names(adapter.unet_ldm_keys or {})
    tensors = {}
    for module, (down, up, alpha) in lora.items():
        if layout == "kohya":
            key = "lora_unet_" + ldm[module].replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
        elif layout == "comfyui":
            key = "diffusion_model." + ldm[module]
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
        else:  # diffusers / peft: no alpha stored, the scale is 1
            assert alpha == down.shape[0]
            tensors.update({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up})
    save_file({k: v.to(torch.float16) if v.ndim else v for k, v in tensors.items()}, str(path))
    return {m: (d.half().float(), u.half().float(), a) for m, (d, u, a) in lora.items()}  # what the file holds


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_the_student_starts_as_the_base_with_the_lora_merged(sdxl_from_file, tmp_path, layout):
    adapter = sdxl_from_file()
    modules = pick_modules(adapter)
    lora = write(tmp_path / "speed.safetensors", random_lora(adapter, modules, ranks=[4, 2, 4, 3, 1],
                                                             alphas=[2.0, 1.0, 4.0, 3.0, 0.5]), layout, adapter)
    expected_student = x0(adapter, merged_by_hand(adapter, lora))
    expected_teacher = x0(adapter, adapter.network)

    trainer = DecoupledDMDTrainer(settings(tmp_path, tmp_path / "speed.safetensors"), adapter, PROMPTS)
    assert trainer.config.network_dim == 4  # the file's largest rank; the smaller ones are zero-padded
    assert trainer.config.lora_target_modules[-1:] == ["time_embedding.linear_1"]  # joined the default targets
    torch.testing.assert_close(x0(adapter, trainer.roles.activate("student")), expected_student, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0(adapter, trainer.roles.activate("teacher")), expected_teacher, rtol=0, atol=0)
    assert not torch.allclose(expected_student, expected_teacher, atol=1e-3)
    fake = x0(adapter, trainer.roles.activate("fake"))
    torch.testing.assert_close(fake, expected_teacher, rtol=1e-5, atol=1e-6)  # the fake starts as the teacher


def test_a_diffusers_lora_of_fewer_layers_leaves_the_others_at_zero(tiny_model_dir, tmp_path):
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    modules = pick_modules(adapter)[:2]
    lora = write(tmp_path / "lcm.safetensors", random_lora(adapter, modules, [4, 4], [4.0, 4.0]), "diffusers", adapter)
    expected = x0(adapter, merged_by_hand(adapter, lora))
    trainer = DecoupledDMDTrainer(settings(tmp_path, tmp_path / "lcm.safetensors", resolution=64), adapter, PROMPTS)
    torch.testing.assert_close(x0(adapter, trainer.roles.activate("student")), expected, rtol=1e-4, atol=1e-5)
    adapted = {k for k in trainer.roles.trainable_state_dict("student") if k.endswith("lora_B.student.weight")}
    untouched = [k for k in adapted if not any(k.startswith(m + ".") for m in modules)]
    assert untouched and all(not trainer.roles.trainable_state_dict("student")[k].any() for k in untouched)


def test_the_students_files_record_the_init_lora_and_resume_keeps_it(tiny_model_dir, tmp_path):
    def teacher():
        return DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))

    adapter = teacher()
    write(tmp_path / "speed.safetensors", random_lora(adapter, pick_modules(adapter), [2] * 5, [1.0] * 5),
          "kohya", adapter)
    path = DecoupledDMDTrainer(settings(tmp_path, tmp_path / "speed.safetensors", resolution=64), adapter,
                               PROMPTS).train()
    metadata = read_student_metadata(path)
    assert metadata["decoupled_dmd.network_weights"] == "speed.safetensors"
    assert metadata["decoupled_dmd.network_weights_sha256"] == file_sha256(str(tmp_path / "speed.safetensors"))
    assert metadata["decoupled_dmd.network_dim"] == "2" and str(tmp_path) not in metadata["decoupled_dmd.config"]
    resumed = DecoupledDMDTrainer(settings(tmp_path, tmp_path / "speed.safetensors", resume="latest",
                                           max_train_steps=2, resolution=64), teacher(), PROMPTS)
    resumed.train()
    assert resumed.step == 2


def test_lora_files_that_do_not_fit_are_refused_with_what_is_wrong(sdxl_from_file, tiny_model_dir, tmp_path):
    adapter = sdxl_from_file()
    modules = pick_modules(adapter)
    good = {k: v for k, v in random_lora(adapter, modules[:1], [2], [2.0]).items()}
    cases = {
        "unknown": ({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
                     "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2)}, {}, "name no layer"),
        "text encoder": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}, {},
                         "text encoders"),
        "other family": ({}, {"ss_base_model_version": "sd_v1"}, "LoRA for sd15"),
        "lycoris": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, {}, "only plain LoRA"),
    }
    for name, (extra, metadata, says) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        tensors = {}
        ldm = lora_module_names(adapter.unet_ldm_keys)
        for module, (down, up, _alpha) in good.items():
            key = "lora_unet_" + ldm[module].replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        save_file({**tensors, **extra}, str(path), metadata=metadata or None)
        with pytest.raises(CheckpointError, match=says):
            DecoupledDMDTrainer(settings(tmp_path, path), adapter, PROMPTS)

    sd15 = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    write(tmp_path / "sd15.safetensors", random_lora(sd15, pick_modules(sd15), [2] * 5, [2.0] * 5), "kohya", sd15)
    with pytest.raises(ConfigError, match="another model"):  # names that exist in both, shapes that do not
        DecoupledDMDTrainer(settings(tmp_path, tmp_path / "sd15.safetensors"), adapter, PROMPTS)
    with pytest.raises(ConfigError, match="training_mode"):
        settings(tmp_path, tmp_path / "sd15.safetensors", training_mode="full")
