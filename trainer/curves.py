"""Training curves (loss, gradient norm, latent mean/std) drawn from metrics.jsonl with PIL only.

ComfyUI's environment has no matplotlib: this draws one small panel per quantity, enough to see collapse
(gen_std falling) or divergence (grad norms exploding) at a glance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PANELS = (
    ("loss", ("loss_generator", "loss_fake")),
    ("gradient norm", ("grad_norm_student", "grad_norm_fake")),
    ("latent mean / std", ("gen_mean", "gen_std")),
)
COLOURS = ((31, 119, 180), (255, 127, 14))


def draw_curves(records: list[dict], width: int = 768, panel_height: int = 200) -> Tensor:
    """(3, H, W) image in [0, 1]: one panel per entry of PANELS, x = step."""
    image = curves_image(records, width, panel_height)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def curves_image(records: list[dict], width: int = 768, panel_height: int = 200):
    """draw_curves as a PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, panel_height * len(PANELS)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin_left, margin = 60, 18
    for index, (title, keys) in enumerate(PANELS):
        top = index * panel_height
        box = (margin_left, top + margin, width - margin, top + panel_height - margin)
        draw.rectangle(box, outline=(160, 160, 160))
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                  for k in keys}
        values = [v for points in series.values() for _, v in points]
        steps = [s for points in series.values() for s, _ in points]
        label = title + ("" if values else " (no data yet)")
        draw.text((margin_left + 4, top + 2), label, fill=(0, 0, 0))
        if not values:
            continue
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 1.0, high + 1.0
        first, last = min(steps), max(steps)
        span = max(last - first, 1)
        draw.text((2, box[1]), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((2, box[3] - 12), f"{low:.3g}", fill=(0, 0, 0))
        draw.text((box[2] - 60, box[3] + 2), f"step {last}", fill=(0, 0, 0))
        for (key, points), colour in zip(series.items(), COLOURS):
            xy = [(box[0] + (box[2] - box[0]) * (s - first) / span,
                   box[3] - (box[3] - box[1]) * (v - low) / (high - low)) for s, v in points]
            if len(xy) == 1:
                x, y = xy[0]
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            elif xy:
                draw.line(xy, fill=colour, width=2)
            draw.text((box[2] - 200 + 100 * list(series).index(key), top + 2), key, fill=colour)
    return image
