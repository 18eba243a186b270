"""The diffusers adapter against diffusers' own schedulers and the text encoders it wraps."""

import pytest
import torch

from decoupled_dmd.trainer.adapters.diffusers import DiffusersAdapter
from decoupled_dmd.trainer.denoiser import PromptCache


@pytest.mark.parametrize("tiny, family, prediction_type", [
    ("tiny-sd15", "sd15", "epsilon"), ("tiny-sd15-v", "sd15", "v_prediction"),
    ("tiny-sdxl", "sdxl", "epsilon"), ("tiny-flow", "flow", "flow"),
])
def test_x0_agrees_with_diffusers_schedulers(tiny_model_dir, tiny, family, prediction_type):
    """x0 from the adapter and the noise it implies rebuild x_t and the raw output with diffusers' formulas."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = tiny_model_dir(tiny)
    adapter = DiffusersAdapter.from_pretrained(folder)
    assert (adapter.family, adapter.prediction_type) == (family, prediction_type)
    cond = adapter.encode_prompts(["a photo of the cat", "a red house"])
    x_t = torch.randn(2, *adapter.latent_shape(*adapter.default_resolution), generator=torch.Generator().manual_seed(0))
    timesteps = [700, 150]
    level = adapter.schedule.level(torch.tensor(timesteps))
    x0 = adapter.predict_x0(adapter.network, x_t, level, cond)

    kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if family == "sdxl":
        size = adapter.default_resolution[0]
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                       "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                dtype=torch.float32)}
    with torch.no_grad():
        raw = adapter.network(x_t, torch.tensor(timesteps, dtype=torch.float32), return_dict=False, **kwargs)[0]
    if family == "flow":
        reference = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        sigmas = torch.tensor(timesteps, dtype=torch.float32) / 1000
        noise = x0 + raw  # velocity = noise - x0
        rebuilt = (1 - sigmas)[:, None, None, None] * x0 + sigmas[:, None, None, None] * noise
        assert reference.config.num_train_timesteps == 1000
    else:
        reference = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        t = torch.tensor(timesteps)
        alpha_bar = reference.alphas_cumprod[t][:, None, None, None]
        noise = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        rebuilt = reference.add_noise(x0, noise, t)
        if prediction_type == "epsilon":
            torch.testing.assert_close(noise, raw, atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(reference.get_velocity(x0, noise, t), raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rebuilt, x_t, atol=1e-4, rtol=1e-4)


def test_k_sigmas_match_diffusers_euler(tiny_model_dir):
    from diffusers import EulerDiscreteScheduler

    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    euler = EulerDiscreteScheduler.from_pretrained(tiny_model_dir("tiny-sd15"), subfolder="scheduler",
                                           timestep_spacing="leading")  # integer timesteps: no interpolation
    euler.set_timesteps(10)
    levels = adapter.schedule.level(euler.timesteps.round())
    torch.testing.assert_close(adapter.schedule.k_sigma(levels).float(), euler.sigmas[:-1], rtol=1e-4, atol=1e-4)


def test_sdxl_conditioning_is_penultimate_states_and_pooled_projection(tiny_model_dir):
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl"))
    prompt = ["a red house"]
    cond = adapter.encode_prompts(prompt)
    states = []
    for tokenizer, encoder in zip(adapter.tokenizers, adapter.text_encoders):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat(states, dim=-1))
    torch.testing.assert_close(cond["text_embeds"], out.text_embeds)
    assert cond["encoder_hidden_states"].shape[-1] == adapter.network.config.cross_attention_dim


def test_zero_uncond_mode_zeroes_only_the_empty_prompt(tiny_model_dir):
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl"), uncond_mode="zeros")
    cond = adapter.encode_prompts(["", "a red house"])
    for tensor in cond.tensors.values():
        assert torch.count_nonzero(tensor[0]) == 0
        assert torch.count_nonzero(tensor[1]) > 0
    normal = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl")).encode_prompts([""])
    assert torch.count_nonzero(normal["encoder_hidden_states"]) > 0


def test_prompt_cache_encodes_each_prompt_once(tiny_model_dir):
    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sd15"))
    calls = []
    original = adapter.encode_prompts
    adapter.encode_prompts = lambda prompts: calls.append(list(prompts)) or original(prompts)
    cache = PromptCache(adapter)
    first = cache.get(["a red house", "the dog", "a red house"])
    again = cache.get(["the dog"])
    assert calls == [["a red house", "the dog"]]
    torch.testing.assert_close(first["encoder_hidden_states"][1], again["encoder_hidden_states"][0])
    torch.testing.assert_close(first["encoder_hidden_states"][0], first["encoder_hidden_states"][2])


def test_a_folder_that_is_not_a_model_says_what_is_missing(tmp_path):
    from decoupled_dmd.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="missing unet/, text_encoder/, tokenizer/, scheduler/"):
        DiffusersAdapter.from_pretrained(str(tmp_path))


def test_batched_x0_is_one_call_that_equals_the_separate_calls(tiny_model_dir):
    """CFG's cond / uncond rows (and a third at another level) through one call give each row's own x0."""
    from decoupled_dmd.trainer.denoiser import batched_x0

    adapter = DiffusersAdapter.from_pretrained(tiny_model_dir("tiny-sdxl"))
    denoiser = adapter.denoiser()
    calls = []

    def counted(x_t, level, cond):
        calls.append(x_t.shape[0])
        return denoiser(x_t, level, cond)

    generator = torch.Generator().manual_seed(0)
    shape = adapter.latent_shape(*adapter.default_resolution)
    cond, uncond = adapter.encode_prompts(["a red house", "a cat"]), adapter.encode_prompts(["", ""])
    rows = [(torch.randn(2, *shape, generator=generator), adapter.schedule.level(torch.tensor(t)), c)
            for t, c in (([700, 300], cond), ([700, 300], uncond), ([100, 900], cond))]
    with torch.no_grad():
        together = batched_x0(counted, rows)
        separate = [denoiser(*row) for row in rows]
    assert calls == [6]
    assert [x.shape[0] for x in together] == [2, 2, 2]
    for joint, alone in zip(together, separate):
        torch.testing.assert_close(joint, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # cond and uncond really differ
