"""Config: kohya-shaped TOML, strict keys and values, CLI overrides, documented defaults."""

import os
import subprocess
import sys

import pytest

from decoupled_dmd.trainer.config import KEYS, ConfigError, TrainConfig, config_from_dict, load_config

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_sections_are_cosmetic_and_flags_override(tmp_path):
    path = write(tmp_path, """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd15"
[anything_at_all]
network_dim = 16
learning_rate = 1e-4
[method]
student_timesteps = [999, 499]
""")
    config = load_config(path, {"network_dim": "32", "renoise_schedule": "coupled-shared"})
    assert config.network_dim == 32  # the flag wins over the file
    assert config.learning_rate == 1e-4
    assert config.student_timesteps == [999, 499]
    assert config.renoise_schedule == "coupled-shared"
    assert config.effective_fake_learning_rate == 1e-4


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "[training]\nnetwork_dims = 8\n")
    with pytest.raises(ConfigError, match="unknown key 'network_dims'; did you mean 'network_dim'"):
        load_config(path)


@pytest.mark.parametrize("key, value, message", [
    ("renoise_schedule", "hybrid", "renoise_schedule: 'hybrid' is not allowed; choose one of"),
    ("regularizer", "gan", "regularizer: 'gan' is not allowed"),
    ("student_timesteps", [249, 499], "student_timesteps"),
    ("student_timesteps", [999, 10], "must be above min_timestep"),
    ("network_dim", 0, "network_dim: 0 must be > 0"),
    ("network_dim", 2.5, "network_dim: 2.5 is not a valid int"),
    ("learning_rate", "fast", "learning_rate: 'fast' is not a valid float"),
    ("mixed_precision", "fp8", "mixed_precision"),
    ("resolution", "1000,77", "multiples of 8"),
    ("guidance_scale", 0.5, "guidance_scale: 0.5 must be >= 1"),
    ("cfg_augmentation", "maybe", "cfg_augmentation: 'maybe' is not a valid bool"),
    ("output_name", "../escape", "plain file name"),
    ("regression_loss_weight", -1.0, "regression_loss_weight"),
    ("lr_scheduler", "exponential", "lr_scheduler: 'exponential' is not allowed"),
    ("generator_step_weighting", "eps", "generator_step_weighting: 'eps' is not allowed"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict({key: value})


def test_dm_only_needs_the_dm_regularizer():
    assert config_from_dict({"cfg_augmentation": False}).regularizer == "dm"
    with pytest.raises(ConfigError, match="cfg_augmentation"):
        config_from_dict({"cfg_augmentation": "false", "regularizer": "none"})


def test_regression_pairs_and_steps_are_checked_only_when_the_loss_is_on():
    assert config_from_dict({"regression_pairs": 0}).regression_pairs == 0  # off: not used
    with pytest.raises(ConfigError, match="regression_pairs: 0 must be >= 1"):
        config_from_dict({"regression_loss_weight": 1.0, "regression_pairs": 0})
    with pytest.raises(ConfigError, match="regression_teacher_steps: 1 must be >= 2"):
        config_from_dict({"regression_loss_weight": 1.0, "regression_teacher_steps": 1})


def test_resolution_forms():
    assert config_from_dict({"resolution": 1024}).resolution_hw() == (1024, 1024)
    assert config_from_dict({"resolution": "1024,768"}).resolution_hw() == (768, 1024)
    assert TrainConfig().resolution_hw() is None


def test_toml_round_trip(tmp_path):
    config = config_from_dict({"network_dim": 8, "guidance_scale": 4.5, "lora_target_modules": ["to_q", "to_k"]})
    path = write(tmp_path, config.to_toml())
    assert load_config(path) == config


def test_duplicate_key_across_sections_is_an_error(tmp_path):
    path = write(tmp_path, "[a]\nseed = 1\n[b]\nseed = 2\n")
    with pytest.raises(ConfigError, match="seed: set twice"):
        load_config(path)


def test_readme_documents_every_key_with_its_default():
    text = open(README, encoding="utf-8").read()
    for name in KEYS:
        assert f"| `{name}` |" in text, f"README does not document {name}"


def test_cli_rejects_a_bad_key_before_loading_any_model(tmp_path):
    path = write(tmp_path, "pretrained_model_name_or_path = '/nonexistent'\nfake_updates_per_stp = 3\n")
    result = subprocess.run([sys.executable, "-m", "decoupled_dmd.trainer.cli", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean 'fake_updates_per_step'" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_key_has_a_value_type_with_a_parser_and_none_is_special_cased_by_name():
    """Issue 31: no key is typed `Any`; each carries its value type, and parsing is a table lookup."""
    from decoupled_dmd.trainer.config import _VALUE_TYPES, OptionalBool, OptionalFloat

    for name, f in KEYS.items():
        assert f.metadata["value_type"] is list or f.metadata["value_type"] in _VALUE_TYPES, name
        assert "Any" not in str(f.type), name
    optional = {k for k, f in KEYS.items() if f.metadata["value_type"] in (OptionalFloat, OptionalBool)}
    assert optional == {"guidance_scale", "fake_learning_rate", "v_parameterization"}
    config = config_from_dict({"guidance_scale": "", "fake_learning_rate": "2e-5", "v_parameterization": "yes"})
    assert (config.guidance_scale, config.fake_learning_rate, config.v_parameterization) == (None, 2e-5, True)
    with pytest.raises(ConfigError, match="guidance_scale: True is not a valid float"):
        config_from_dict({"guidance_scale": True})
