"""Write workflows/<name>.jpg, the thumbnail ComfyUI's Templates browser shows beside the pack's template
`<name>.json`: a picture of the graph itself, drawn by ComfyUI's own frontend in headless Chromium (a user sees
what the template builds before opening it; the workflow PNGs' images are noise from a random test checkpoint).

Needs a running ComfyUI with this pack installed (any models: nothing is run), Playwright and a Chromium:

    python scripts/make_template_thumbnails.py --url http://127.0.0.1:8188 [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
WIDTH = 512  # the longer side of a thumbnail, in pixels
MAX_ASPECT = 2.0  # wider graphs are cropped on the right (the template card is about square)
# a closed network: no background connections, no first-run or component downloads (tests/comfyui/test_browser.py
# launches its Chromium with these too)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Fit every node into the canvas (at most 100%) and return the graph's box on the page.
FIT = """() => {
    const canvas = window.app.canvas, nodes = window.app.graph._nodes;
    const boxes = nodes.map(n => Array.from(n.getBounding()));
    const left = Math.min(...boxes.map(b => b[0])) - 20, top = Math.min(...boxes.map(b => b[1])) - 20;
    const right = Math.max(...boxes.map(b => b[0] + b[2])) + 20, bottom = Math.max(...boxes.map(b => b[1] + b[3])) + 20;
    const rect = canvas.canvas.getBoundingClientRect();
    const scale = Math.min(1, rect.width / (right - left), rect.height / (bottom - top));
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = (rect.width / scale - (right - left)) / 2 - left;
    canvas.ds.offset[1] = (rect.height / scale - (bottom - top)) / 2 - top;
    canvas.setDirty(true, true); canvas.draw(true, true);
    const width = (right - left) * scale, height = (bottom - top) * scale;
    return {x: rect.left + (rect.width - width) / 2, y: rect.top + (rect.height - height) / 2, width, height};
}"""


def templates() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """The thumbnail's size for a graph picture of width x height: at most MAX_ASPECT wide, WIDTH on the longer
    side."""
    width = min(width, round(height * MAX_ASPECT))
    scale = WIDTH / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def capture(page, name: str):
    """The graph of workflows/<name>.json as the frontend draws it (PIL image)."""
    from PIL import Image

    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as handle:
        graph = json.load(handle)
    page.keyboard.press("Escape")
    page.evaluate("async (graph) => { await window.app.loadGraphData(graph); }", graph)
    page.wait_for_timeout(500)
    box = page.evaluate(FIT)
    page.wait_for_timeout(300)
    with Image.open(io.BytesIO(page.screenshot(clip=box))) as shot:
        shot = shot.convert("RGB")
    size = thumbnail_size(*shot.size)
    crop = shot.crop((0, 0, min(shot.width, round(shot.height * MAX_ASPECT)), shot.height))
    return crop.resize(size, Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with this pack")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "", help="the Chromium to drive")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium found: give --chromium (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        # the graphs fit at 100%: no low-quality drawing
        page = browser.new_page(viewport={"width": 3840, "height": 1600})
        page.goto(args.url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensions", timeout=120_000)
        page.wait_for_timeout(1000)
        for name in templates():
            path = os.path.join(WORKFLOWS, f"{name}.jpg")
            capture(page, name).save(path, format="JPEG", quality=85)
            print(path)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
