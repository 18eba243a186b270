"""workflows/<name>.png: each workflow has a small PNG of its result that restores the graph when dragged into
ComfyUI (the `workflow` text chunk is the shipped UI workflow; `prompt` is the API graph that made the image).
Regenerate them with tests/comfyui/make_workflow_pngs.py against a running ComfyUI; this check needs no server."""

import json
import os

import pytest
from PIL import Image

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = sorted(f[: -len(".api.json")] for f in os.listdir(os.path.join(WORKFLOWS, "api")) if f.endswith(".api.json"))


@pytest.mark.parametrize("name", NAMES)
def test_workflow_has_a_png_that_restores_its_graph(name):
    path = os.path.join(WORKFLOWS, f"{name}.png")
    assert os.path.isfile(path), f"no {name}.png: run tests/comfyui/make_workflow_pngs.py"
    assert os.path.getsize(path) < 200_000
    with Image.open(path) as image:
        image.load()
        chunks = dict(image.text)
        assert image.size[0] >= 64 and image.size[1] >= 64
    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as handle:
        assert json.loads(chunks["workflow"]) == json.load(handle)
    with open(os.path.join(WORKFLOWS, "api", f"{name}.api.json"), encoding="utf-8") as handle:
        shipped = json.load(handle)
    ran = json.loads(chunks["prompt"])
    assert {k: v["class_type"] for k, v in ran.items()} == {k: v["class_type"] for k, v in shipped.items()}


def test_the_template_folder_holds_ui_workflows_each_with_its_thumbnail():
    """ComfyUI serves the first of example_workflows/, example/, examples/, workflow/, workflows/ that exists as
    the pack's templates, and lists its *.json; its Templates browser shows <name>.jpg beside each."""
    import sys

    repo = os.path.dirname(WORKFLOWS)
    assert not [d for d in ("example_workflows", "example", "examples", "workflow")
                if os.path.isdir(os.path.join(repo, d))]
    listed = sorted(f[: -len(".json")] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
    assert listed == NAMES  # UI files only: the API twins live in workflows/api/
    sys.path.insert(0, os.path.join(repo, "scripts"))
    try:
        from make_template_thumbnails import MAX_ASPECT, WIDTH
    finally:
        sys.path.pop(0)
    for name in listed:
        path = os.path.join(WORKFLOWS, f"{name}.jpg")
        assert os.path.getsize(path) < 100_000, name
        with Image.open(path) as image:
            # a picture of the graph (scripts/make_template_thumbnails.py), not a 64-px sample
            assert image.format == "JPEG" and max(image.size) == WIDTH, (name, image.size)
            assert image.size[0] <= image.size[1] * MAX_ASPECT + 1, (name, image.size)


def test_thumbnail_size_by_hand():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(WORKFLOWS), "scripts"))
    try:
        from make_template_thumbnails import thumbnail_size
    finally:
        sys.path.pop(0)
    assert thumbnail_size(3400, 1100) == (512, 256)  # cropped to twice as wide as high, then 512 wide
    assert thumbnail_size(1000, 800) == (512, 410)
    assert thumbnail_size(800, 1000) == (410, 512)
