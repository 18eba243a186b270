"""Write workflows/<name>.jpg from workflows/<name>.png: ComfyUI's Templates browser shows a pack's template
`<name>.json` with the thumbnail `<name>.jpg` beside it (the PNG stays the shareable file with the graph inside).

    python scripts/make_template_thumbnails.py    # after regenerating the PNGs (tests/test_workflow_pngs.py checks)
"""

from __future__ import annotations

import os
import sys

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
SIZE = 256  # the longer side, as the template cards show them


def templates() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))


def thumbnail(name: str):
    from PIL import Image

    with Image.open(os.path.join(WORKFLOWS, f"{name}.png")) as image:
        image = image.convert("RGB")
        image.thumbnail((SIZE, SIZE))
        return image


def main() -> int:
    for name in templates():
        thumbnail(name).save(os.path.join(WORKFLOWS, f"{name}.jpg"), format="JPEG", quality=85)
    return 0


if __name__ == "__main__":
    sys.exit(main())
