"""Lay out the UI workflows in workflows/ so that no node overlaps another, also after a run (image nodes grow).

Columns follow the data flow (a node sits one column right of its deepest input); within a column nodes stack
top to bottom, and each image output gets a column of its own so that its growth has free space below. Sizes
are what the nodes need: the Train node's many widgets, room for an image in preview and save nodes. Rewrites
workflows/<name>.json and the `workflow` chunk of workflows/<name>.png (the image and its `prompt` chunk are
kept).

    python scripts/layout_workflows.py
"""

from __future__ import annotations

import json
import os

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
TITLE, GAP, WIDTH = 30, 40, 360
# what they need
HEIGHTS = {"DecoupledDMD_Train": 640, "DecoupledDMD_Settings": 700, "PreviewImage": 420, "SaveImage": 420}
IMAGE_NODES = ("PreviewImage", "SaveImage")


def layout(ui: dict) -> dict:
    nodes = {n["id"]: n for n in ui["nodes"]}
    sources: dict[int, list[int]] = {i: [] for i in nodes}
    for link in ui["links"]:
        sources[link[3]].append(link[1])
    depth: dict[int, int] = {}

    def column(node_id: int) -> int:
        if node_id not in depth:
            depth[node_id] = 1 + max((column(s) for s in sources[node_id]), default=-1)
        return depth[node_id]

    columns: dict[int, list[int]] = {}
    for node_id in sorted(nodes):
        columns.setdefault(column(node_id), []).append(node_id)
    lanes: list[list[int]] = []  # left to right: each column's other nodes, then one lane per image node
    for _, members in sorted(columns.items()):
        others = [i for i in members if nodes[i]["type"] not in IMAGE_NODES]
        lanes += ([others] if others else []) + [[i] for i in members if nodes[i]["type"] in IMAGE_NODES]
    for index, lane in enumerate(lanes):
        y = 60
        for node_id in lane:
            node = nodes[node_id]
            height = max(node["size"][1], HEIGHTS.get(node["type"], 0))
            node["pos"], node["size"] = [40 + index * (WIDTH + 60), y], [max(node["size"][0], WIDTH), height]
            y += height + TITLE + GAP
    return ui


def main() -> int:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    for name in sorted(f[: -len(".json")] for f in os.listdir(WORKFLOWS) if f.endswith(".json")):
        path = os.path.join(WORKFLOWS, f"{name}.json")
        with open(path, encoding="utf-8") as handle:
            ui = layout(json.load(handle))
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
        png = os.path.join(WORKFLOWS, f"{name}.png")
        if not os.path.isfile(png):  # a new workflow: tests/comfyui/make_workflow_pngs.py makes its PNG
            continue
        with Image.open(png) as image:
            image.load()
            text, picture = dict(image.text), image.copy()
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, json.dumps(ui) if key == "workflow" else value)
        picture.save(png, pnginfo=info, compress_level=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
