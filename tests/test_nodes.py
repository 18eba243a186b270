"""The node schemas and the shipped workflows, checked without ComfyUI (CI has none)."""

import json
import os

import pytest
import torch

from decoupled_dmd import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from decoupled_dmd.nodes.dmd_nodes import (
    FewStepSampler,
    LoadTeacher,
    SaveDistilled,
    Settings,
    Train,
    check_output_name,
    check_resolution,
    downstream_problem,
    failed_text,
    finished_text,
    read_prompt_lines,
    stopped_text,
)
from decoupled_dmd.nodes.runtime import (
    check_file_name,
    parse_timesteps,
    trailing_timesteps,
)
from decoupled_dmd.trainer.formats import checkpoint_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(REPO, "workflows")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_LISTS = {"network_weights"}
with open(os.path.join(os.path.dirname(__file__), "comfyui_stock_nodes.json"), encoding="utf-8") as _handle:
    STOCK = json.load(_handle)["nodes"]  # the stock nodes the workflows use, from ComfyUI's /object_info


def _inputs(cls) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _schema(class_type: str):
    """{input: (type, options, optional)} and the output types, for our nodes and the stock ones."""
    if class_type in NODE_CLASS_MAPPINGS:
        cls = NODE_CLASS_MAPPINGS[class_type]
        spec = cls.INPUT_TYPES()
        inputs = {}
        for section in ("required", "optional"):
            for name, (kind, *options) in spec.get(section, {}).items():
                # a file list (models/loras) depends on the ComfyUI it runs in: any name is checked there
                choices = kind if isinstance(kind, list) and name not in FILE_LISTS else None
                inputs[name] = ("COMBO" if isinstance(kind, list) else kind, options[0] if options else {},
                                section == "optional", choices)
        return inputs, list(cls.RETURN_TYPES)
    if class_type in STOCK:
        node = STOCK[class_type]
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in node["input"][section].items():
                inputs[name] = (spec["type"], spec, section == "optional", spec.get("options"))
        return inputs, node["output"]
    raise AssertionError(f"unknown node type {class_type!r}")


def test_node_ids_are_namespaced_and_displayed():
    assert set(NODE_CLASS_MAPPINGS) == {"DecoupledDMD_LoadTeacher", "DecoupledDMD_Settings", "DecoupledDMD_Train",
                                        "DecoupledDMD_SaveDistilled", "DecoupledDMD_FewStepSampler"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_schema(name):
    cls = NODE_CLASS_MAPPINGS[name]
    assert cls.CATEGORY.split("/")[0] in ("training", "sampling")
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.DESCRIPTION
    returns = cls.RETURN_TYPES
    assert len(getattr(cls, "RETURN_NAMES", returns)) == len(returns) == len(cls.OUTPUT_TOOLTIPS)
    for input_name, (kind, *options) in _inputs(cls).items():
        assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
        if kind in ("INT", "FLOAT"):
            opts = options[0]
            assert "min" in opts and "max" in opts, f"{name}.{input_name} needs min and max"
            assert opts["min"] <= opts["default"] <= opts["max"]
        if isinstance(kind, list):
            assert options[0].get("default", kind[0]) in kind


def test_train_defaults_build_a_valid_config():
    from decoupled_dmd.trainer.config import config_from_dict

    spec, expert = _inputs(Train), _inputs(Settings)
    config = config_from_dict({"network_dim": spec["network_dim"][1]["default"],
                               "learning_rate": spec["learning_rate"][1]["default"],
                               "renoise_schedule": expert["renoise_schedule"][1]["default"],
                               "student_timesteps": trailing_timesteps(spec["steps"][1]["default"])})
    assert config.student_timesteps == [999, 749, 499, 249]


def test_validation_messages_say_what_to_change():
    assert check_resolution(0) is None and check_resolution(1024) is None
    assert "multiple of 8" in check_resolution(100000)
    assert "multiple of 8" in check_resolution(100)
    assert Train.VALIDATE_INPUTS(prompts="a cat", prompt_file="") is True
    assert "no training prompts" in Train.VALIDATE_INPUTS(prompts=" \n# only a note\n", prompt_file="")
    assert Train.VALIDATE_INPUTS(prompts="", prompt_file=None) is True  # linked: checked when the node runs
    assert Settings.VALIDATE_INPUTS(timesteps="999,499") is True
    assert "strictly decreasing" in Settings.VALIDATE_INPUTS(timesteps="499,999")
    with pytest.raises(ValueError, match="below max_timestep"):
        Settings().settings(**{**_settings_widgets(), "min_timestep": 500, "max_timestep": 400})
    assert "plain name" in check_output_name("../x") and check_output_name("run") is None
    assert "inside its models folder" in SaveDistilled.VALIDATE_INPUTS(lora_name="../evil")
    assert read_prompt_lines("a cat\n\n# note\n  a dog ") == ["a cat", "a dog"]


def _settings_widgets() -> dict:
    inputs = Settings.INPUT_TYPES()
    return {name: spec[1]["default"] for section in ("required", "optional") for name, spec in inputs[section].items()}


def test_each_validation_answer_is_filed_under_the_inputs_it_concerns():
    """ComfyUI files a VALIDATE_INPUTS answer under every input the function names: each node names only the
    inputs its answers are about."""
    import inspect

    named = {cls.__name__: inspect.getfullargspec(cls.VALIDATE_INPUTS).args[1:]
             for cls in (Train, Settings, SaveDistilled, FewStepSampler)}
    assert named == {"Train": ["prompts", "prompt_file"], "Settings": ["timesteps"], "SaveDistilled": ["lora_name"],
                     "FewStepSampler": ["timesteps"]}


def test_a_bad_save_distilled_name_is_refused_by_the_train_node_that_feeds_it():
    prompt = {"5": {"class_type": "DecoupledDMD_Train", "inputs": {}},
              "6": {"class_type": "DecoupledDMD_SaveDistilled",
                    "inputs": {"student": ["5", 2], "save_lora": True, "lora_name": "../evil",
                               "save_checkpoint": False, "checkpoint_name": "/abs"}}}
    problem = downstream_problem(prompt, "5")
    assert "node 6" in problem and "lora_name" in problem and "nothing is trained" in problem
    assert downstream_problem(prompt, "7") is None  # fed by another Train node
    prompt["6"]["inputs"].update(lora_name="fine", save_checkpoint=True)
    assert "checkpoint_name" in downstream_problem(prompt, "5")
    prompt["6"]["inputs"].update(save_checkpoint=False)
    assert downstream_problem(prompt, "5") is None
    prompt["7"] = {"class_type": "DecoupledDMD_FewStepSampler", "inputs": {"model": ["5", 0], "timesteps": "499,999"}}
    assert "Few-Step Sampler (node 7)" in downstream_problem(prompt, "5")


def test_how_a_run_ended_is_said_with_what_to_do_and_where_the_files_are():
    from types import SimpleNamespace

    from decoupled_dmd.trainer.config import ConfigError
    from decoupled_dmd.trainer.loop import TrainingFailed

    result = SimpleNamespace(student_path="/o/run/run.safetensors", state_dir="/o/run/state-000003", steps_done=3,
                             metrics_file="/o/run/logs/metrics.jsonl")
    assert "state-000003" in stopped_text(result) and "Queue again unchanged" in stopped_text(result)
    assert "nothing was trained" in stopped_text(SimpleNamespace(student_path=None))
    text = finished_text(result, 6)
    assert all(part in text for part in ("3/6", "run.safetensors", "state-000003", "metrics.jsonl"))
    assert failed_text(ConfigError("resolution 12: use 16")) == ("refused", "refused: resolution 12: use 16")
    assert failed_text(TrainingFailed("every update was non-finite"))[0] == "failed"


def test_exceptions_keep_their_package_name_when_comfyui_imports_the_pack_by_path():
    from decoupled_dmd.trainer.errors import public_name

    exec_globals = {"__name__": "/x/custom_nodes/ComfyUI-DecoupledDMD.trainer.errors"}
    exec("class Oops(ValueError):\n    pass", exec_globals)
    assert public_name(exec_globals["Oops"]).__module__ == "decoupled_dmd.trainer.errors"


def test_only_the_first_copy_of_the_pack_claims_the_process(monkeypatch, tmp_path):
    import sys

    from decoupled_dmd import copies

    monkeypatch.delitem(sys.modules, copies.CLAIM, raising=False)
    first, second = tmp_path / "ComfyUI-DecoupledDMD", tmp_path / "decoupled-dmd"
    first.mkdir()
    second.mkdir()
    assert copies.claim(str(first)) is None and copies.claim(str(first)) is None  # the same folder again
    assert copies.claim(str(second)) == str(first.resolve())


def test_file_names_cannot_escape_the_models_folder():
    assert check_file_name("student") == "student.safetensors"
    assert check_file_name("sub/student.safetensors") == "sub/student.safetensors"
    for bad in ("../student", "/etc/passwd", "a/../../b", "C:/x", "", "  "):
        with pytest.raises(ValueError):
            check_file_name(bad)


def test_timesteps():
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert trailing_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert trailing_timesteps(1) == [999]
    assert parse_timesteps(" 999, 749 ,499") == [999, 749, 499]
    for bad in ("", "1000,2", "499,999", "a,b"):
        with pytest.raises(ValueError):
            parse_timesteps(bad)


def test_checkpoint_metadata_restates_the_lora_header():
    metadata = checkpoint_metadata({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                                    "decoupled_dmd.format": "lora", "ss_network_dim": "64"})
    assert metadata == {"modelspec.architecture": "stable-diffusion-xl-v1-base", "decoupled_dmd.format": "checkpoint"}


def _workflow_names():
    return sorted(f[: -len(".api.json")] for f in os.listdir(os.path.join(WORKFLOWS, "api")) if f.endswith(".api.json"))


def test_every_workflow_has_both_formats_and_a_numbered_title():
    """The Templates browser shows each file's name as its card's title (ComfyUI lists a pack's templates in
    directory order): the names say what each does, numbered in the order a creator uses them."""
    names = _workflow_names()
    assert [name.split(" - ")[0] for name in names] == [str(n) for n in range(1, len(names) + 1)], names
    assert [name.split(" - ")[1].split()[0] for name in names] == ["Distil"] * 3 + ["Sample"] * 2
    for name in names:
        assert os.path.isfile(os.path.join(WORKFLOWS, f"{name}.json")), name
        assert os.path.isfile(os.path.join(WORKFLOWS, f"{name}.jpg")), name


def test_the_sampling_templates_load_what_the_distil_templates_write_by_default():
    """A creator who runs the templates in order: the sampling ones read the LoRA file that Save Distilled writes
    with its defaults (the all-in-one checkpoint is off by default)."""
    graphs = {}
    for name in _workflow_names():
        with open(os.path.join(WORKFLOWS, "api", f"{name}.api.json"), encoding="utf-8") as handle:
            graphs[name] = json.load(handle)
    written = set()
    for name, graph in graphs.items():
        for node in graph.values():
            if node["class_type"] == "DecoupledDMD_SaveDistilled":
                inputs = node["inputs"]
                assert inputs["save_lora"] and not inputs["save_checkpoint"], name
                written.add(check_file_name(inputs["lora_name"]))
    assert "dmd_student_lora.safetensors" in written  # template 1's; 2 and 3 write their own names
    for name, graph in graphs.items():
        if not name.split(" - ")[1].startswith("Sample"):
            continue
        loras = {node["inputs"]["lora_name"] for node in graph.values() if node["class_type"] == "LoraLoader"}
        files = {node["inputs"].get("metadata_file") for node in graph.values()} - {None, ""}
        assert loras == files == {"dmd_student_lora.safetensors"} or (loras <= written and not files), name


@pytest.mark.parametrize("name", _workflow_names())
def test_api_workflow_names_existing_nodes_and_valid_inputs(name):
    with open(os.path.join(WORKFLOWS, "api", f"{name}.api.json"), encoding="utf-8") as handle:
        graph = json.load(handle)
    for node_id, node in graph.items():
        inputs, _ = _schema(node["class_type"])
        given = node["inputs"]
        unknown = set(given) - set(inputs)
        assert not unknown, f"{name} node {node_id}: unknown inputs {unknown}"
        for input_name, (kind, options, optional, choices) in inputs.items():
            if input_name not in given:  # a widget is always written (the UI converter emits optional ones too)
                assert optional and kind not in WIDGET_TYPES, \
                    f"{name} node {node_id} ({node['class_type']}): {input_name} missing"
                continue
            value = given[input_name]
            if kind not in WIDGET_TYPES:
                source, slot = value
                assert source in graph, f"{name} node {node_id}: link to missing node {source}"
                _, outputs = _schema(graph[source]["class_type"])
                assert outputs[slot] == kind, f"{name} node {node_id}.{input_name}: {outputs[slot]} into {kind}"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], f"{name} node {node_id}.{input_name}={value}"
            elif kind == "COMBO" and choices:
                assert value in choices, f"{name} node {node_id}.{input_name}={value!r}"
            elif kind == "BOOLEAN":
                assert isinstance(value, bool)
            elif kind == "STRING":
                assert isinstance(value, str)
        if node["class_type"] == "DecoupledDMD_Train":
            assert NODE_CLASS_MAPPINGS["DecoupledDMD_Train"].VALIDATE_INPUTS(
                **{k: given[k] for k in ("prompts", "prompt_file")}) is True
            assert check_resolution(given["resolution"]) is None and check_output_name(given["output_name"]) is None
            assert downstream_problem(graph, node_id) is None


@pytest.mark.parametrize("name", _workflow_names())
def test_ui_workflow_matches_its_api_twin(name):
    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as handle:
        ui = json.load(handle)
    with open(os.path.join(WORKFLOWS, "api", f"{name}.api.json"), encoding="utf-8") as handle:
        api = json.load(handle)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in nodes.items():
        assert node["type"] == api[node_id]["class_type"]
        inputs, outputs = _schema(node["type"])
        expected = []
        for input_name, (kind, _options, _, _) in inputs.items():
            if kind in WIDGET_TYPES:  # every widget, required or optional: a new input cannot go stale unseen
                assert input_name in api[node_id]["inputs"], f"{name} node {node_id}: widget {input_name} missing"
                expected.append(api[node_id]["inputs"][input_name])
                if input_name in ("seed", "noise_seed"):
                    expected.append("fixed")  # the frontend's control_after_generate widget
        assert node["widgets_values"] == expected, f"{name} node {node_id}"
        for slot, item in enumerate(node["inputs"]):
            if item["link"] is not None:
                _, source, source_slot, target, target_slot, kind = links[item["link"]]
                assert (str(target), target_slot) == (node_id, slot)
                assert api[node_id]["inputs"][item["name"]] == [str(source), source_slot]
                assert kind == inputs[item["name"]][0]


def _defaults(cls) -> dict:
    widgets = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            widgets[name] = options.get("default", spec[0][0] if isinstance(spec[0], list) else None)
    return widgets


def test_every_widget_maps_to_a_config_key_and_the_defaults_make_a_valid_config():
    from decoupled_dmd.nodes.dmd_nodes import SETTINGS_EXTRA, SETTINGS_WIDGETS, TRAIN_WIDGETS, train_config_values
    from decoupled_dmd.trainer.config import KEYS, config_from_dict

    widgets, expert = _defaults(Train), _defaults(Settings)
    not_config = {"teacher", "settings", "prompts", "prompt_file", "output_name", "steps"}
    assert set(widgets) - not_config == set(TRAIN_WIDGETS)  # a new widget must say where it goes
    assert set(expert) == set(SETTINGS_WIDGETS) | set(SETTINGS_EXTRA)
    assert all(key in KEYS for key, _ in [*TRAIN_WIDGETS.values(), *SETTINGS_WIDGETS.values()])
    values = train_config_values(dict(widgets, output_name=" my_student "))  # no Settings node: its defaults
    assert values == train_config_values(dict(widgets, output_name=" my_student "), Settings.defaults())
    config = config_from_dict(dict(values, output_dir="out"))
    assert config.output_name == "my_student" and config.log_with == "none"
    assert config.student_timesteps == trailing_timesteps(widgets["steps"])
    assert config.train_batch_size == widgets["batch_size"] and config.optimizer_type == expert["optimizer"]
    for key in ("renoise_schedule", "regularizer", "update_normalization", "fake_updates_per_step", "min_timestep",
                "max_timestep", "network_alpha", "network_dim", "learning_rate"):  # the trainer's defaults
        assert getattr(config, key) == KEYS[key].default, key
    assert config.fake_learning_rate == config.learning_rate  # fake_lr_ratio 1: DMD2's equal rates
    assert config.resume == "latest" and expert["resume"] is True
    assert widgets["network_weights"] == "[None]" and config.network_weights == ""
    assert expert["mixed_precision"] == "auto"  # what the device supports: bf16 on GPUs that have it
    assert config.mixed_precision == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    chosen = Settings().settings(**dict(expert, timesteps="999,499", fake_lr_ratio=4.0, resume=False,
                                        renoise_schedule="coupled-shared", mixed_precision="fp16"))[0]
    values = train_config_values(dict(widgets, output_name="x", learning_rate=1e-4), chosen)
    assert values["student_timesteps"] == [999, 499] and values["fake_learning_rate"] == pytest.approx(4e-4)
    assert values["resume"] == "" and values["renoise_schedule"] == "coupled-shared"
    assert values["mixed_precision"] == "fp16" and "preview_prompts" not in values and "timesteps" not in values


def test_every_bound_comes_from_the_config_and_no_widget_allows_what_the_trainer_refuses():
    """Issue 31: one source of limits. Every numeric widget that sets a config key spans only values the config
    accepts (its min, max and default pass `BOUNDS`), the seeds and resolution share the config's limits, and the
    CLIs refuse exactly past them."""
    from decoupled_dmd.nodes.dmd_nodes import SETTINGS_WIDGETS, TRAIN_WIDGETS, FewStepSampler, check_resolution
    from decoupled_dmd.trainer.cli import sample_main
    from decoupled_dmd.trainer.config import (
        BOUNDS,
        KEYS,
        MAX_RESOLUTION,
        SAMPLING_SEED,
        ConfigError,
        config_from_dict,
        resolution_problem,
    )

    checked = 0
    for cls, mapping in ((Train, TRAIN_WIDGETS), (Settings, SETTINGS_WIDGETS)):
        inputs = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                if spec[0] not in ("INT", "FLOAT") or name not in mapping:
                    continue
                key, convert = mapping[name]
                if key == "resolution":
                    continue  # 0 = the model's own; checked below
                options = spec[1]
                for value in (options["min"], options["max"], options["default"]):
                    converted = convert(value) if convert else value
                    bounds = BOUNDS.get(key)
                    assert bounds is None or bounds.contains(converted), (name, key, value)
                checked += 1
    assert checked >= 10
    seed = Train.INPUT_TYPES()["required"]["seed"][1]
    assert (seed["min"], seed["max"]) == (BOUNDS["seed"].low, BOUNDS["seed"].high)
    with pytest.raises(ConfigError, match="seed"):
        config_from_dict({"seed": seed["max"] + 1})
    sampler_seed = FewStepSampler.INPUT_TYPES()["required"]["seed"][1]
    assert (sampler_seed["min"], sampler_seed["max"]) == (SAMPLING_SEED.low, SAMPLING_SEED.high)
    for value in (-1, SAMPLING_SEED.high + 1):  # dmd-sample refuses past the same limits, in one line
        with pytest.raises(SystemExit):
            sample_main(["--model", "builtin:tiny-sd15", "--prompt", "x", "--seed", str(value)])
    resolution = Train.INPUT_TYPES()["required"]["resolution"][1]
    assert resolution["max"] == MAX_RESOLUTION and resolution_problem(MAX_RESOLUTION, MAX_RESOLUTION) is None
    assert check_resolution(MAX_RESOLUTION) is None and check_resolution(MAX_RESOLUTION + 8) is not None
    assert all(k in KEYS for k in BOUNDS)


def test_settings_added_after_release_are_optional_and_an_old_graph_gets_the_trainers_defaults():
    """A graph saved before the averaging, lr schedule and regression widgets existed (API format: those inputs
    absent) still validates and trains with the trainer's defaults; set, they reach the config."""
    from decoupled_dmd.nodes.dmd_nodes import train_config_values
    from decoupled_dmd.trainer.config import KEYS, config_from_dict

    added = {"student_ema_decay", "lr_scheduler", "regression_loss_weight", "regression_pairs"}
    spec = Settings.INPUT_TYPES()
    assert set(spec["optional"]) == added and not added & set(spec["required"])
    widgets, expert = _defaults(Train), _defaults(Settings)
    old_graph = {k: v for k, v in expert.items() if k not in added}
    values = train_config_values(dict(widgets, output_name="x"), Settings().settings(**old_graph)[0])
    assert not added & set(values)
    config = config_from_dict(dict(values, output_dir="out"))
    assert {k: getattr(config, k) for k in added} == {k: KEYS[k].default for k in added}
    assert config.student_ema_decay == 0.0 and config.regression_loss_weight == 0.0  # both off by default
    chosen = Settings().settings(**dict(expert, student_ema_decay=0.97, lr_scheduler="cosine",
                                        regression_loss_weight=1.0, regression_pairs=16))[0]
    config = config_from_dict(dict(train_config_values(dict(widgets, output_name="x"), chosen), output_dir="out"))
    assert (config.student_ema_decay, config.lr_scheduler, config.regression_loss_weight,
            config.regression_pairs) == (0.97, "cosine", 1.0, 16)


def test_the_train_node_holds_the_everyday_settings_and_guidance_has_no_magic_zero():
    """Issue 13: the Train node is short (what a creator sets each run); guidance shows its value or `auto`."""
    rows = [name for name, spec in _inputs(Train).items() if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES]
    assert len(rows) <= 13, rows
    assert {"max_train_steps", "steps", "resolution", "batch_size", "network_dim", "learning_rate", "seed",
            "output_name", "preview_every"} <= set(rows)
    choices, options = LoadTeacher.INPUT_TYPES()["required"]["guidance_scale"]
    assert options["default"] == "auto" and "auto" in options["tooltip"] and "SDXL 8" in options["tooltip"]
    assert all(float(c) >= 1.0 for c in choices if c != "auto") and "0" not in choices


@pytest.mark.parametrize("name", _workflow_names())
def test_ui_workflow_nodes_do_not_overlap_and_images_have_room_to_grow(name):
    """Boxes include the title bar LiteGraph draws above `pos`; preview and save nodes grow downward after a run,
    so nothing may sit below them in their column (scripts/layout_workflows.py lays them out so)."""
    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as handle:
        nodes = json.load(handle)["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}
    for a, box_a in boxes.items():
        for b, box_b in boxes.items():
            if a < b:
                overlap = box_a[0] < box_b[2] and box_b[0] < box_a[2] and box_a[1] < box_b[3] and box_b[1] < box_a[3]
                assert not overlap, f"{name}: nodes {a} and {b} overlap"
    train = [n for n in nodes if n["type"] == "DecoupledDMD_Train"]
    assert all(n["size"][1] >= 600 for n in train)  # its widgets need that much (newer frontends)
    for image in (n for n in nodes if n["type"] in ("PreviewImage", "SaveImage")):
        left, _, right, bottom = boxes[image["id"]]
        below = [i for i, box in boxes.items() if box[0] < right and left < box[2] and box[1] >= bottom]
        assert not below, f"{name}: node(s) {below} below image node {image['id']}"


def test_the_train_node_text_says_step_loss_and_time_left():
    from decoupled_dmd.nodes.dmd_nodes import step_text

    assert step_text(2, 10, {"loss_generator": 0.5, "seconds_per_step": 30.0}) == \
        "step 2/10 · loss 0.5000 · 30.00 s/step · about 4 min left"
    assert step_text(10, 2000, {"loss_generator": 0.01, "seconds_per_step": 8.3}).endswith("about 4.6 h left")
    assert step_text(1, 3, {"loss_generator": 0.1, "seconds_per_step": 2.0}).endswith("about 4 s left")


def test_curve_history_keeps_each_nodes_latest_run_thinned_to_its_limit():
    """What GET /decoupled_dmd/curves serves the web extension after a page (re)load."""
    from decoupled_dmd.nodes.dmd_nodes import CurveHistory, curve_message

    history = CurveHistory(limit=4)
    for step in range(1, 4):
        history.add(curve_message("a", 3, step, 9, {"loss_generator": 1.0 / step}), "cat_run")
    history.add(curve_message("x", 7, 1, 2, {"gen_std": 0.5}), "other")
    kept = history.snapshot()
    assert kept["3"]["run"] == "a" and kept["3"]["output_name"] == "cat_run" and kept["3"]["total"] == 9
    assert [r["step"] for r in kept["3"]["records"]] == [1, 2, 3] and kept["3"]["text"].startswith("step 3/9")
    assert kept["3"]["records"][1]["values"] == {"loss_generator": 0.5}
    kept["3"]["records"].clear()  # a snapshot is a copy
    assert len(history.snapshot()["3"]["records"]) == 3
    for step in range(4, 7):  # 6 > 4 records: every other one, the newest kept -> 1, 3, 5, 6
        history.add(curve_message("a", 3, step, 9, {}), "cat_run")
    assert [r["step"] for r in history.snapshot()["3"]["records"]] == [1, 3, 5, 6]
    history.add(curve_message("b", 3, 1, 5, {}), "cat_run")  # a new queue of node 3 replaces its run
    assert history.snapshot()["3"]["run"] == "b" and len(history.snapshot()["3"]["records"]) == 1
    assert history.snapshot()["7"]["run"] == "x"


def test_routes_are_only_registered_inside_comfyui():
    from decoupled_dmd.nodes import runtime
    from decoupled_dmd.nodes.dmd_nodes import CurveHistory

    assert runtime.register_routes(CurveHistory()) is False  # no ComfyUI server module here


def test_curve_message_carries_the_finite_curve_values_of_one_update():
    """Issue 13: the live curves (web/decoupled_dmd.js) are drawn from one message per update."""
    from decoupled_dmd.nodes.dmd_nodes import curve_message

    logs = {"loss_generator": 0.5, "loss_fake": 0.2, "gen_std": 1.0, "gen_mean": 0.0, "grad_norm_student": 3,
            "grad_norm_fake": float("nan"), "seconds_per_step": 2.0, "lr": 1e-4}
    message = curve_message("run1", 7, 3, 10, logs)
    assert message["run"] == "run1" and message["node"] == "7" and (message["step"], message["total"]) == (3, 10)
    # NaN (no fake update yet) and quantities that are not curves are left out; ints become floats
    assert message["values"] == {"loss_generator": 0.5, "loss_fake": 0.2, "gen_std": 1.0, "gen_mean": 0.0,
                                 "grad_norm_student": 3.0}
    assert message["text"] == "step 3/10 · loss 0.5000 · 2.00 s/step · about 14 s left"
    import json

    json.dumps(message, allow_nan=False)  # what the websocket sends: strict JSON




def test_comfyuis_novram_mode_is_refused_with_what_to_do_and_lowvram_trains():
    from decoupled_dmd.trainer.adapters.comfy import partial_loading_problem

    assert "Restart ComfyUI without --novram" in partial_loading_problem("NO_VRAM")
    assert all(partial_loading_problem(state) is None
               for state in ("LOW_VRAM", "NORMAL_VRAM", "HIGH_VRAM", "SHARED", "CPU", "DISABLED"))
