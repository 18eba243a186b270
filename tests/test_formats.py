"""Single-file LDM checkpoints in; kohya LoRA, all-in-one checkpoint, metadata and safe writes out."""

import errno
import hashlib
import json
import os
import shutil
import struct

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from decoupled_dmd.trainer import ldm_layout as layout
from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.adapters.single_file import load_single_file
from decoupled_dmd.trainer.api import apply_student, load_teacher, read_student_metadata
from decoupled_dmd.trainer.config import ConfigError, config_from_dict
from decoupled_dmd.trainer.formats import (
    CheckpointError,
    inspect_checkpoint,
    read_safetensors_header,
    shareable_config,
    write_ldm_checkpoint,
)
from decoupled_dmd.trainer.loop import DecoupledDMDTrainer, list_states
from decoupled_dmd.trainer.outputs import atomic_write

PROMPTS = ["a photo of the cat", "a red house"]


def tokenizer_of(tiny_model_dir, tiny="tiny-sd15"):
    return os.path.join(tiny_model_dir(tiny), "tokenizer")


def raw_tensor_bytes(path):
    """{name: (dtype, shape, raw bytes)} read straight from the file, independent of our writer."""
    header, start = read_safetensors_header(path)
    out = {}
    with open(path, "rb") as handle:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            out[name] = (entry["dtype"], entry["shape"], handle.read(end - begin))
    return out


# --- the key layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny", ["tiny-sd15", "tiny-sdxl"])
def test_our_diffusers_to_ldm_map_inverts_diffusers_own_conversion(tiny_model_dir, tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = DiffusersAdapter.from_pretrained(tiny_model_dir(tiny)).network
    state = unet.state_dict()
    keys = layout.unet_key_map(dict(unet.config), state.keys())
    assert len(set(keys.values())) == len(keys)  # one LDM name per weight
    ldm = {layout.UNET_PREFIX + keys[k]: v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_unet_config_is_derived_from_tensor_shapes_for_a_distilled_layout():
    """A Vega/SSD-1B-like SDXL layout: 3 levels, 2 res blocks, depths [0, 1, 2], a thinner up path."""
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=[0, 1, 2],
                  reverse_transformer_layers_per_block=[[2, 1, 1], [1, 1, 1], [0, 0, 0]],
                  cross_attention_dim=48, attention_head_dim=[1, 1, 1], use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64)
    unet = UNet2DConditionModel(**config)
    keys = layout.unet_key_map(dict(unet.config), unet.state_dict().keys())
    shapes = {keys[k]: tuple(v.shape) for k, v in unet.state_dict().items()}
    derived = layout.unet_config_from_ldm(shapes, "sdxl")
    assert derived["block_out_channels"] == [32, 64, 64]
    assert derived["layers_per_block"] == 2
    assert derived["transformer_layers_per_block"] == [0, 1, 2]
    assert derived["reverse_transformer_layers_per_block"] == [[2, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert derived["down_block_types"] == list(config["down_block_types"])
    assert derived["up_block_types"] == list(config["up_block_types"])
    assert derived["cross_attention_dim"] == 48 and derived["use_linear_projection"] is True
    rebuilt = UNet2DConditionModel(**derived, addition_time_embed_dim=8)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in unet.state_dict().items()}


# --- loading ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny", ["tiny-sd15", "tiny-sdxl", "tiny-sd15-v"])
def test_single_file_loads_the_same_model_as_the_diffusers_folder(tiny_model_dir, ldm_checkpoint, tiny):
    reference = DiffusersAdapter.from_pretrained(tiny_model_dir(tiny))
    path = ldm_checkpoint(tiny, torch.float32)
    adapter = load_teacher(path, tokenizer_path=tokenizer_of(tiny_model_dir, tiny))
    assert (adapter.family, adapter.prediction_type) == (reference.family, reference.prediction_type)
    assert adapter.source_checkpoint == os.path.abspath(path)
    for mine, theirs in [(adapter.network, reference.network), (adapter.vae, reference.vae),
                         *zip(adapter.text_encoders, reference.text_encoders, strict=True)]:
        ours, expected = mine.state_dict(), theirs.state_dict()
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in expected)
    cond, expected_cond = adapter.encode_prompts(PROMPTS + [""]), reference.encode_prompts(PROMPTS + [""])
    for name in expected_cond.tensors:
        torch.testing.assert_close(cond[name], expected_cond[name], rtol=0, atol=0)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict_x0(adapter.network, x, level, cond),
                                   reference.predict_x0(reference.network, x, level, expected_cond),
                                   rtol=1e-4, atol=1e-4)


def test_v_prediction_comes_from_the_v_pred_key_or_the_config_flag(tiny_model_dir, ldm_checkpoint):
    assert inspect_checkpoint(ldm_checkpoint("tiny-sd15-v")).prediction_type == "v_prediction"
    assert inspect_checkpoint(ldm_checkpoint("tiny-sd15")).prediction_type == "epsilon"
    assert inspect_checkpoint(ldm_checkpoint("tiny-sd15"), v_parameterization=True).prediction_type == "v_prediction"
    adapter = load_teacher(ldm_checkpoint("tiny-sd15"), tokenizer_path=tokenizer_of(tiny_model_dir),
                           v_parameterization=True)
    assert adapter.prediction_type == "v_prediction"


def _rewrite(source, target, change):
    tensors = load_file(source)
    change(tensors)
    save_file(tensors, target)
    return target


def test_refuses_what_it_cannot_load_with_a_message_that_says_what_to_do(ldm_checkpoint, tiny_model_dir, tmp_path):
    source = ldm_checkpoint("tiny-sd15")
    cases = {}
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    cases["pickled .ckpt"] = (str(pickled), "pickled checkpoint")
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    cases["renamed pickle"] = (str(renamed), "holds a pickle")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(source, "rb").read()[: os.path.getsize(source) // 2])
    cases["truncated"] = (str(truncated), "truncated")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    cases["lora"] = (str(lora), "is a LoRA")
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, flux)
    cases["flux"] = (str(flux), "Flux")

    def sd2(tensors):  # SD2.x: no ADM input, linear proj_in
        for key in [k for k in tensors if k.endswith("proj_in.weight")]:
            tensors[key] = tensors[key][:, :, 0, 0]

    cases["sd2"] = (_rewrite(source, str(tmp_path / "sd2.safetensors"), sd2), "2.x")

    def inpaint(tensors):
        key = layout.UNET_PREFIX + "input_blocks.0.0.weight"
        tensors[key] = torch.zeros(tensors[key].shape[0], 9, *tensors[key].shape[2:])

    cases["inpainting"] = (_rewrite(source, str(tmp_path / "inpaint.safetensors"), inpaint), "inpainting")
    for _name, (path, expected) in cases.items():
        with pytest.raises(CheckpointError, match=expected):
            load_teacher(path, tokenizer_path=tokenizer_of(tiny_model_dir))
    assert not list(tmp_path.glob(".partial-*"))


def test_tokenizer_errors_name_the_missing_files(ldm_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks merges.txt"):
        load_single_file(ldm_checkpoint("tiny-sd15"), tokenizer_path=str(tmp_path / "tok"))
    with pytest.raises(CheckpointError, match="set tokenizer_path"):
        from decoupled_dmd.trainer.adapters.single_file import resolve_tokenizer_folder

        resolve_tokenizer_folder("")


def test_tokenizer_is_found_in_the_hugging_face_cache(tiny_model_dir, ldm_checkpoint, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer_of(tiny_model_dir), name), snapshot / name)
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load_single_file(ldm_checkpoint("tiny-sd15"))
    reference = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    assert adapter.tokenizers[0](PROMPTS).input_ids == reference.tokenizers[0](PROMPTS).input_ids


# --- training from a single file and the files it writes -----------------------------------------------------------
def train_from_file(tmp_path, tiny_model_dir, checkpoint, **overrides):
    values = dict(pretrained_model_name_or_path=checkpoint, tokenizer_path=tokenizer_of(tiny_model_dir),
                  output_dir=str(tmp_path / "out"), max_train_steps=2, network_dim=4, network_alpha=2,
                  learning_rate=5e-3, fake_updates_per_step=1, log_with="none", train_batch_size=2, resolution=64,
                  save_precision="float", save_merged_checkpoint=True)
    values.update(overrides)
    config = config_from_dict(values)
    adapter = load_teacher(checkpoint, tokenizer_path=config.tokenizer_path)
    trainer = DecoupledDMDTrainer(config, adapter, PROMPTS)
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, ldm_checkpoint, tmp_path_factory):
    """One LoRA run from an fp16 single-file SD1.5 checkpoint, with the merged checkpoint written."""
    tmp_path = tmp_path_factory.mktemp("trained")
    checkpoint = ldm_checkpoint("tiny-sd15", torch.float16)
    trainer, lora_path = train_from_file(tmp_path, tiny_model_dir, checkpoint)
    return trainer, lora_path, trainer.output_paths["checkpoint"], checkpoint


def student_ldm_weights(trainer):
    """The trained student's merged UNet in LDM names, float32: the reference every route must reproduce."""
    merged = trainer.roles.merged_state_dict("student")
    return {layout.UNET_PREFIX + trainer.adapter.unet_ldm_keys[k]: v.float() for k, v in merged.items()}


def test_lora_is_kohya_layout_and_our_own_merge_reproduces_the_student(trained):
    trainer, lora_path, _, checkpoint = trained
    lora = load_file(lora_path)
    base = {k: v.float() for k, v in load_file(checkpoint).items() if k.startswith(layout.UNET_PREFIX)}
    names = {k.split(".")[0] for k in lora}
    assert all(k.startswith("lora_unet_") for k in lora)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora)
    # an SD1.5 student names its modules by diffusers paths, as kohya's own SD1.5 LoRAs do
    assert "lora_unet_up_blocks_0_attentions_0_proj_in" in names and not any("input_blocks" in n for n in names)
    ldm_keys = trainer.adapter.unet_ldm_keys
    by_kohya = {"lora_unet_" + path.replace(".", "_"): layout.UNET_PREFIX + ldm_keys[module + ".weight"]
                for module, path in trainer.adapter.kohya_lora_names().items()}
    assert names <= by_kohya.keys()
    merged = dict(base)
    for name in names:
        down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
        scale = lora[f"{name}.alpha"].item() / down.shape[0]
        weight = by_kohya[name]
        merged[weight] = base[weight] + scale * (up.flatten(1) @ down.flatten(1)).reshape(base[weight].shape)
    expected = student_ldm_weights(trainer)
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the student did move
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-3, atol=2e-3)  # base was stored in fp16


def test_diffusers_lora_loader_reproduces_the_student(trained, tiny_model_dir):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    trainer, lora_path, _, checkpoint = trained
    fresh = load_single_file(checkpoint, tokenizer_path=tokenizer_of(tiny_model_dir))
    # as StableDiffusionPipeline.load_lora_weights reads it: without the UNet's config (no LDM-path remapping)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(lora_path)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, fresh.network, adapter_name="dmd")
    fresh.network.fuse_lora(adapter_names=["dmd"])
    fused = {k.replace(".base_layer", ""): v for k, v in fresh.network.state_dict().items() if "lora_" not in k}
    expected = trainer.roles.merged_state_dict("student")
    assert fused.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(fused[key].float(), expected[key].float(), rtol=1e-4, atol=1e-5)


def test_merged_checkpoint_replaces_only_unet_tensors_and_keeps_layout_and_dtype(trained):
    trainer, _, merged_path, checkpoint = trained
    source, merged = raw_tensor_bytes(checkpoint), raw_tensor_bytes(merged_path)
    assert merged.keys() == source.keys()
    lora_targets = {layout.UNET_PREFIX + trainer.adapter.unet_ldm_keys[k]
                    for k in trainer.roles.lazy_delta_weights("student")}
    changed = 0
    for name, (dtype, shape, data) in source.items():
        assert merged[name][:2] == (dtype, shape)
        if name in lora_targets:
            changed += merged[name][2] != data
        else:
            assert merged[name][2] == data, f"{name} changed"  # text encoders, VAE, untouched UNet: same bytes
    assert changed > 0
    expected = student_ldm_weights(trainer)
    tensors = load_file(merged_path)
    for name in lora_targets:
        assert tensors[name].dtype == torch.float16
        torch.testing.assert_close(tensors[name].float(), expected[name], rtol=2e-3, atol=2e-3)


def test_merged_checkpoint_loads_as_the_student_and_samples_like_base_plus_lora(trained, tiny_model_dir):
    from decoupled_dmd.trainer.api import sample_images

    trainer, lora_path, merged_path, checkpoint = trained
    tokenizer = tokenizer_of(tiny_model_dir)
    merged = load_teacher(merged_path, tokenizer_path=tokenizer)
    timesteps = apply_student(merged, merged_path)
    assert timesteps == [999, 749, 499, 249]
    base = load_teacher(checkpoint, tokenizer_path=tokenizer)
    assert apply_student(base, lora_path) == timesteps
    a = sample_images(merged, PROMPTS, seed=3, timesteps=timesteps, resolution=(64, 64), device="cpu")
    b = sample_images(base, PROMPTS, seed=3, timesteps=timesteps, resolution=(64, 64), device="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2)  # fp16 rounding of the merged weights only


def test_every_file_carries_the_metadata_a_loader_needs(trained):
    trainer, lora_path, merged_path, checkpoint = trained
    digest = hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    for path, architecture in [(lora_path, "stable-diffusion-v1/lora"), (merged_path, "stable-diffusion-v1")]:
        metadata = read_student_metadata(path)
        assert metadata["modelspec.architecture"] == architecture
        assert metadata["modelspec.title"] and metadata["modelspec.date"].startswith("20")
        assert metadata["decoupled_dmd.method"] == "decoupled-dmd"
        assert metadata["decoupled_dmd.steps"] == "4"
        assert json.loads(metadata["decoupled_dmd.student_timesteps"]) == [999, 749, 499, 249]
        assert json.loads(metadata["decoupled_dmd.comfyui_sampler"]) == {
            "sampler_name": "lcm", "scheduler": "sgm_uniform", "cfg": 1.0, "steps": 4}
        assert metadata["decoupled_dmd.base_sha256"] == digest
        assert metadata["decoupled_dmd.base_model"] == os.path.basename(checkpoint)
        restored = config_from_dict({k: v for s in toml.loads(metadata["decoupled_dmd.config"]).values()
                                     for k, v in s.items()})
        assert restored == shareable_config(trainer.config)  # the config, with local paths cut to names
        assert restored.pretrained_model_name_or_path == os.path.basename(checkpoint)
    with safe_open(merged_path, framework="pt") as handle:
        assert handle.metadata()["source"] == "test"  # the input file's own metadata is kept


def test_ldm_round_trip_is_exact(tiny_model_dir, ldm_checkpoint, tmp_path):
    """LDM -> our model -> LDM gives back every tensor unchanged (fp32 source)."""
    for tiny in ("tiny-sd15", "tiny-sdxl"):
        source = ldm_checkpoint(tiny, torch.float32)
        adapter = load_single_file(source, tokenizer_path=tokenizer_of(tiny_model_dir, tiny))
        again = write_ldm_checkpoint(str(tmp_path / f"{tiny}.safetensors"), family=adapter.family, unet=adapter.network,
                                     text_encoders=adapter.text_encoders, vae=adapter.vae,
                                     prediction_type=adapter.prediction_type)
        original, rewritten = load_file(source), load_file(again)
        assert original.keys() == rewritten.keys()
        assert all(torch.equal(original[k], rewritten[k]) for k in original)


def test_full_mode_writes_an_ldm_unet_and_a_merged_checkpoint(tiny_model_dir, ldm_checkpoint, tmp_path):
    checkpoint = ldm_checkpoint("tiny-sd15", torch.float32)
    trainer, unet_path = train_from_file(tmp_path, tiny_model_dir, checkpoint, training_mode="full", max_train_steps=1,
                                         learning_rate=1e-4)
    unet = load_file(unet_path)
    assert all(k.startswith(layout.UNET_PREFIX) for k in unet)
    expected = student_ldm_weights(trainer)
    merged = load_file(trainer.output_paths["checkpoint"])
    for key, value in expected.items():
        torch.testing.assert_close(unet[key], value, rtol=0, atol=0)
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0)
    fresh = load_teacher(checkpoint, tokenizer_path=tokenizer_of(tiny_model_dir))
    apply_student(fresh, unet_path)
    reloaded = fresh.network.state_dict()
    student = trainer.roles.merged_state_dict("student")
    assert all(torch.equal(reloaded[k], student[k]) for k in student)


# --- nothing lost ---------------------------------------------------------------------------------------------------
def test_atomic_write_never_overwrites_unless_asked(tmp_path):
    target = tmp_path / "student.safetensors"
    write = lambda text: (lambda staging: open(staging, "w").write(text))  # noqa: E731
    assert atomic_write(str(target), write("one")) == str(target)
    second = atomic_write(str(target), write("two"))
    assert second == str(tmp_path / "student_00001_.safetensors")
    assert atomic_write(str(target), write("three")) == str(tmp_path / "student_00002_.safetensors")
    assert target.read_text() == "one" and open(second).read() == "two"
    assert atomic_write(str(target), write("four"), overwrite=True) == str(target)
    assert target.read_text() == "four"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.safetensors", "student_00001_.safetensors", "student_00002_.safetensors"]


def test_a_full_disk_leaves_no_half_file(tmp_path):
    target = tmp_path / "model.safetensors"

    def fills_the_disk(staging):
        with open(staging, "wb") as handle:
            handle.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="disk full while writing"):
        atomic_write(str(target), fills_the_disk)
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target),
                     lambda staging: (open(staging, "wb").write(b"x"), (_ for _ in ()).throw(KeyboardInterrupt)),
                     overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert target.read_bytes() == b"previous"


def test_a_second_run_gets_a_counter_and_a_resumed_run_keeps_its_files(tiny_model_dir, ldm_checkpoint, tmp_path):
    checkpoint = ldm_checkpoint("tiny-sd15")
    common = dict(max_train_steps=1, save_merged_checkpoint=False)
    _, first = train_from_file(tmp_path, tiny_model_dir, checkpoint, **common)
    first_bytes = open(first, "rb").read()
    with pytest.raises(ConfigError, match="another run's states"):  # its states are never replaced
        train_from_file(tmp_path, tiny_model_dir, checkpoint, seed=1, **common)
    for state in list_states(os.path.dirname(first)):  # once the user has cleared them, a new run may start here
        shutil.rmtree(state)
    _, second = train_from_file(tmp_path, tiny_model_dir, checkpoint, seed=1, **common)
    assert os.path.basename(second) == "dmd_student_00001_.safetensors"
    assert open(first, "rb").read() == first_bytes
    _, resumed = train_from_file(tmp_path, tiny_model_dir, checkpoint, seed=1, resume="latest",
                                 max_train_steps=2, save_merged_checkpoint=False)
    assert resumed == second  # the resumed run continues the file it started


def test_safetensors_stream_writer_is_readable_by_the_library(tmp_path):
    from decoupled_dmd.trainer.formats import write_safetensors_stream

    source = tmp_path / "source.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)},
              source, metadata={"k": "v"})
    header, start = read_safetensors_header(str(source))
    b_begin, b_end = header["b"]["data_offsets"]
    out = tmp_path / "out.safetensors"
    write_safetensors_stream(str(out), [
        ("a", "F16", [2, 3], (lambda: torch.full((2, 3), 7.0), 12)),
        ("b", "BF16", [3], (str(source), start + b_begin, b_end - b_begin)),
        ("c", "F32", [1], struct.pack("<f", 2.5)),
    ], {"m": "1"})
    loaded = load_file(out)
    assert torch.equal(loaded["a"], torch.full((2, 3), 7.0, dtype=torch.float16))
    assert torch.equal(loaded["b"], torch.ones(3, dtype=torch.bfloat16))
    assert loaded["c"].item() == 2.5
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"m": "1"}


# --- each family's LoRA in the names kohya's trainer writes, read by the clients creators use --------------------
def _random_student(family: str):
    """A real-structure UNet of `family` (every block and level of the full model, 1/32 of its width), its base
    weights, and a random LoRA on the trainer's default targets in the kohya layout: (unet, base, lora, merged)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from decoupled_dmd.trainer.adapters.diffusers import UNET_LORA_TARGETS
    from decoupled_dmd.trainer.formats import kohya_lora_state_dict, kohya_module_names, lora_module_names
    from decoupled_dmd.trainer.random_models import unet_config

    config = unet_config(family, width_divisor=32, transformer_layers=(1, 1, 1) if family == "sdxl" else None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rank, alpha = 4, 2.0
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_LORA_TARGETS, init_lora_weights=False))
    peft_state = get_peft_model_state_dict(unet)
    ldm = lora_module_names(layout.unet_key_map(config, base.keys()))
    lora = kohya_lora_state_dict(peft_state, kohya_module_names(family, ldm, {m: m for m in ldm}), alpha)
    merged = dict(base)
    for key, down in peft_state.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            up, weight = peft_state[f"{module}.lora_B.weight"], base[f"{module}.weight"]
            delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            merged[f"{module}.weight"] = weight + delta
    return config, base, lora, merged


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_injects_every_module_and_reproduces_our_merge(family, tmp_path):
    """diffusers-based front ends call the pipeline's `load_lora_weights`: the SD pipeline reads the file without
    the UNet's config (only diffusers paths resolve), the SDXL pipeline with it (LDM paths are remapped)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    config, base, lora, merged = _random_student(family)
    path = str(tmp_path / "student.safetensors")
    save_file(lora, path)
    fresh = UNet2DConditionModel(**config)
    fresh.load_state_dict(base)
    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    state, alphas = mixin.lora_state_dict(path, **({"unet_config": fresh.config} if family == "sdxl" else {}))
    mixin.load_lora_into_unet(state, alphas, fresh, adapter_name="dmd")
    injected = sum(1 for module in fresh.modules() if "dmd" in getattr(module, "lora_A", {}))
    assert injected == len({k.split(".")[0] for k in lora}) > 50
    fresh.fuse_lora(adapter_names=["dmd"])
    fused = {k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if "lora_" not in k}
    assert fused.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-6)


def a1111_module_key(kohya_name: str) -> str:
    """The module a LoRA key names for the A1111 / Forge LoRA loader, by its rules (extensions-builtin/Lora):
    kohya's SD1.x diffusers paths are converted to compvis ones by block arithmetic fixed to SD's two layers per
    block; other `lora_unet_` names (SDXL's LDM paths) are looked up with the prefix swapped."""
    import re

    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    rules = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda b, part, j, rest: f"input_blocks_{1 + 3 * int(b) + int(j)}_{1 if part == 'attentions' else 0}_"
                                  f"{rest if part == 'attentions' else resnet[rest]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda part, j, rest: f"middle_block_{1 if part == 'attentions' else 2 * int(j)}_"
                               f"{rest if part == 'attentions' else resnet[rest]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda b, part, j, rest: f"output_blocks_{3 * int(b) + int(j)}_{1 if part == 'attentions' else 0}_"
                                  f"{rest if part == 'attentions' else resnet[rest]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda b: f"input_blocks_{3 * int(b) + 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda b: f"output_blocks_{3 * int(b) + 2}_{1 + (int(b) != 0)}_conv"),
    ]
    for pattern, to_compvis in rules:
        match = re.fullmatch(pattern, kohya_name)
        if match:
            return "diffusion_model_" + to_compvis(*match.groups())
    return kohya_name.replace("lora_unet_", "diffusion_model_", 1)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_key_maps_to_a_module_by_the_a1111_forge_loader_rules(family):
    config, base, lora, _ = _random_student(family)
    ldm = layout.unet_key_map(config, base.keys())
    modules = {"diffusion_model_" + v[: -len(".weight")].replace(".", "_"): v for v in ldm.values()
               if v.endswith(".weight")}
    names = {k.split(".")[0] for k in lora}
    unmatched = sorted(name for name in names if a1111_module_key(name) not in modules)
    assert not unmatched, unmatched[:5]
    for name in names:  # the LoRA's shape fits the module it lands on
        weight = base[next(k for k, v in ldm.items() if v == modules[a1111_module_key(name)])]
        assert lora[f"{name}.lora_up.weight"].shape[0] == weight.shape[0]
        assert lora[f"{name}.lora_down.weight"].shape[1] == weight.shape[1]


def test_students_written_with_ldm_paths_before_still_read():
    """SD1.5 students written before kohya's diffusers paths (`lora_unet_input_blocks_1_1_proj_in`) read back
    through `peft_from_kohya` and as `network_weights`."""
    from decoupled_dmd.trainer.formats import kohya_lora_state_dict, lora_aliases, lora_module_names, peft_from_kohya

    config, base, lora, _ = _random_student("sd15")
    ldm = lora_module_names(layout.unet_key_map(config, base.keys()))
    peft_new, rank, alpha = peft_from_kohya(lora, ldm, {m: m for m in ldm})
    old = kohya_lora_state_dict(peft_new, ldm, alpha)
    assert any("input_blocks" in k for k in old)
    peft_old, rank_old, alpha_old = peft_from_kohya(old, ldm, {m: m for m in ldm})
    assert (rank_old, alpha_old) == (rank, alpha) and peft_old.keys() == peft_new.keys()
    assert all(torch.equal(peft_old[k], peft_new[k]) for k in peft_new)
    aliases = {}
    for module, ldm_module in ldm.items():
        aliases.update(lora_aliases(module, module, ldm_module))
    assert {k.split(".")[0] for k in old} <= aliases.keys() and {k.split(".")[0] for k in lora} <= aliases.keys()
