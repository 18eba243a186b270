"""The texture world: procedural, text-conditioned 32x32 RGB images made in code (no download, seeded, unlimited).

Each image is one shape (circle, square, triangle) in a colour, filled with a fine texture (solid, diagonal
stripes of period 4, dots every 2 px, 2-px checks), on a plain dark, mid or light gray background; its
prompt names the shape's three attributes, "a red striped circle", and leaves the background free. (A first
version named black, gray or white backgrounds in the prompt: the CFG effect at noisy levels, where the
background is decided, dwarfed the texture's; and SD's schedule leaves the image mean readable at timestep
999, so its teacher took the background from the starting noise's mean instead of the prompt.) The textures
are aligned to the pixel grid, so the prompt fixes them exactly, and they have the shape colour's mean
brightness, so nothing but the fine structure tells them apart (every period divides 4, the stride of the
UNet's two down-samplings, so a convolutional teacher can place the marks on the grid): layout and colour
resolve at noisy levels, the texture only at clean ones
(`dmd-benchmark --world texture` measures how much of the CFG effect lies there, the paper's case for
SDXL). The teacher is an SD-style epsilon model on SDXL's scaled_linear 1000-step schedule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

IMAGE_SIZE = 32
ATTRIBUTES = {  # what a prompt names
    "colour": ("red", "green", "blue", "yellow"),
    "texture": ("solid", "striped", "dotted", "checkered"),
    "shape": ("circle", "square", "triangle"),
}
SCENE_ATTRIBUTES = {**ATTRIBUTES, "background": ("dark", "mid", "light")}  # what an image has
PROMPT_TEMPLATE = "a {colour} {texture} {shape}"
WORDS = ("a", *itertools.chain.from_iterable(ATTRIBUTES.values()))
TOKEN_LENGTH = 8  # 4 words and the two specials fit
# Shape colours stay below 0.76 per channel, so the brightest texture mark (x 1.25) plus jitter never clips
# and every fill keeps its colour's mean exactly.
COLOURS = {"red": (0.76, 0.12, 0.12), "green": (0.12, 0.62, 0.16), "blue": (0.16, 0.24, 0.76),
           "yellow": (0.76, 0.68, 0.12)}
BACKGROUNDS = {"dark": (0.35, 0.35, 0.35), "mid": (0.50, 0.50, 0.50), "light": (0.65, 0.65, 0.65)}
TEXTURE_CONTRAST = 0.5  # relative brightness swing of a texture's marks around the shape colour
COLOUR_JITTER = 0.02


@dataclass(frozen=True)
class Style:
    """How a world's images look beyond what the prompt names: the background greys and the texture contrast.

    `base` is the world the shipped teacher learnt; `vega` is the "creator's fine-tune" of the fine-tune
    benchmark (finetune.py): a sepia colour grade of the backgrounds (resolved at noisy levels) and crisper
    texture marks (resolved at clean ones), the two ways a style LoRA or a fine-tune moves a model. The prompts,
    shapes and shape colours stay, so the attribute classifier reads both styles.
    """

    backgrounds: dict = field(default_factory=lambda: dict(BACKGROUNDS))
    texture_contrast: float = TEXTURE_CONTRAST


STYLES = {
    "base": Style(),
    "vega": Style(backgrounds={"dark": (0.40, 0.33, 0.25), "mid": (0.58, 0.48, 0.36), "light": (0.74, 0.63, 0.48)},
                  texture_contrast=0.8),
}


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"unknown texture style {name!r}; choose one of {', '.join(STYLES)}")
    return STYLES[name]


def background_tint(images: Tensor, frame: int = 2) -> Tensor:
    """Per-image colour cast of the background: the mean of (red - blue) / 2 over the `frame`-pixel border (in
    [0, 1] units; 0 for the base world's greys, 0.15-0.26 for `vega`'s sepia). Shapes rarely reach the border."""
    x = images.float().clamp(-1.0, 1.0)
    border = torch.ones(x.shape[-2:], dtype=torch.bool)
    border[frame:-frame, frame:-frame] = False
    cast = (x[:, 0] - x[:, 2]) / 4.0  # model range: (R - B) / 2 in [-1, 1] units is (R - B) / 4 in [0, 1] ones
    return cast[:, border].mean(dim=1)


def texture_pattern(name: str, size: int = IMAGE_SIZE) -> Tensor:
    """The texture's marks (size, size) in {0, 1}, fixed to the pixel grid."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if name == "solid":
        return torch.zeros(size, size)
    if name == "striped":  # diagonal stripes, 2 px on / 2 px off along each row
        return (((x + y) % 4) < 2).float()
    if name == "dotted":  # one dot per 2x2 cell
        return ((x % 2 == 0) & (y % 2 == 0)).float()
    if name == "checkered":  # 2x2-pixel checks
        return (((x // 2) + (y // 2)) % 2).float()
    raise ValueError(f"unknown texture {name!r}; one of {ATTRIBUTES['texture']}")


def shape_mask(name: str, cx: Tensor, cy: Tensor, radius: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Masks (B, size, size) in {0, 1} of shapes centred at (cx, cy) with the given radius (pixel units)."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    cx, cy, radius = cx.view(-1, 1, 1), cy.view(-1, 1, 1), radius.view(-1, 1, 1)
    if name == "circle":
        return ((x - cx) ** 2 + (y - cy) ** 2 <= radius**2).float()
    if name == "square":
        half = radius * 0.85
        return (((x - cx).abs() <= half) & ((y - cy).abs() <= half)).float()
    if name == "triangle":  # apex up, base below the centre
        top, bottom = cy - radius, cy + 0.75 * radius
        return ((y >= top) & (y <= bottom) & ((x - cx).abs() <= 0.65 * (y - top))).float()
    raise ValueError(f"unknown shape {name!r}; one of {ATTRIBUTES['shape']}")


def make_prompt(attributes: dict[str, int]) -> str:
    """The prompt of an attribute assignment {'colour': index, ...} (the background is not named)."""
    return PROMPT_TEMPLATE.format(**{k: ATTRIBUTES[k][int(attributes[k])] for k in ATTRIBUTES})


def parse_prompt(prompt: str) -> dict[str, int]:
    """Attribute indices a prompt asks for, or a ValueError naming the words each attribute accepts."""
    words = prompt.lower().split()
    found: dict[str, int] = {}
    for name, values in ATTRIBUTES.items():
        hits = [values.index(w) for w in words if w in values]
        if len(hits) != 1:
            raise ValueError(f"prompt {prompt!r} must name one {name}: one of {', '.join(values)}")
        found[name] = hits[0]
    return found


def all_prompts() -> list[str]:
    """Every attribute combination once (4 x 4 x 3 = 48 prompts), in a fixed order."""
    names = list(ATTRIBUTES)
    return [make_prompt(dict(zip(names, combo)))
            for combo in itertools.product(*(range(len(ATTRIBUTES[n])) for n in names))]


def evaluation_prompts() -> list[str]:
    """The 16 held-out prompts: every colour with every texture, the shape (colour + texture) mod 3. No student
    is trained on them (`training_prompts`), yet each of their attribute values is trained in other
    combinations: the protocol's held-out combinations (protocol.py)."""
    return [make_prompt({"colour": colour, "texture": texture, "shape": index % 3})
            for index, (colour, texture) in enumerate(itertools.product(range(4), range(4)))]


def training_prompts() -> list[str]:
    """The 32 prompts students are trained on: every combination but the held-out ones (`evaluation_prompts`)."""
    held_out = set(evaluation_prompts())
    return [prompt for prompt in all_prompts() if prompt not in held_out]


LAYOUT_PARAMETERS = ("cx", "cy", "radius", "jitter_r", "jitter_g", "jitter_b")


def draw_layout(count: int, generator: torch.Generator) -> dict[str, Tensor]:
    """What an image varies beyond its attributes: the shape's centre and radius (pixels) and a colour jitter
    (count, 3), drawn from `generator` in a fixed order."""
    cx = 12.5 + 7.0 * torch.rand(count, generator=generator)
    cy = 12.5 + 7.0 * torch.rand(count, generator=generator)
    radius = 9.0 + 3.0 * torch.rand(count, generator=generator)
    jitter = (COLOUR_JITTER * torch.randn(count, 3, generator=generator)).clamp(-0.04, 0.04)
    return {"cx": cx, "cy": cy, "radius": radius, "jitter": jitter}


def layout_targets(layout: dict[str, Tensor]) -> Tensor:
    """The layout as (count, 6) numbers of about unit scale (LAYOUT_PARAMETERS' order), for a regression head."""
    return torch.cat([((layout["cx"] - 16.0) / 3.5)[:, None], ((layout["cy"] - 16.0) / 3.5)[:, None],
                      ((layout["radius"] - 10.5) / 1.5)[:, None], layout["jitter"] / COLOUR_JITTER], dim=1)


def render(attributes: dict[str, Tensor], generator: torch.Generator, style: str = "base") -> Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] for per-sample attribute indices (SCENE_ATTRIBUTES: the background
    too) in a `Style` of STYLES; position, size and colour jitter drawn from `generator` (`draw_layout`)."""
    return render_layout(attributes, draw_layout(len(attributes["colour"]), generator), style)


def render_layout(attributes: dict[str, Tensor], layout: dict[str, Tensor], style: str = "base",
                  texture_contrast: Tensor | None = None) -> Tensor:
    """Images for attribute indices and a `draw_layout` layout; `texture_contrast` (count,) overrides the
    style's contrast per image (the instrument's classifier trains on a range of contrasts)."""
    look = get_style(style)
    count = len(attributes["colour"])
    cx, cy, radius = layout["cx"], layout["cy"], layout["radius"]
    jitter = layout["jitter"].view(-1, 3, 1, 1)
    colours = torch.tensor([COLOURS[c] for c in ATTRIBUTES["colour"]])[attributes["colour"]].view(-1, 3, 1, 1)
    backgrounds = torch.tensor([look.backgrounds[b] for b in SCENE_ATTRIBUTES["background"]])[attributes["background"]]
    patterns = torch.stack([texture_pattern(t) for t in ATTRIBUTES["texture"]])[attributes["texture"]]
    contrast = look.texture_contrast if texture_contrast is None else texture_contrast.view(-1, 1, 1)
    # zero-mean marks: a texture keeps the shape colour's mean brightness, so only fine structure tells it
    modulation = 1.0 - contrast * (patterns - patterns.mean(dim=(1, 2), keepdim=True))
    mask = torch.zeros(count, IMAGE_SIZE, IMAGE_SIZE)
    for index, name in enumerate(ATTRIBUTES["shape"]):
        rows = attributes["shape"] == index
        if rows.any():
            mask[rows] = shape_mask(name, cx[rows], cy[rows], radius[rows])
    fill = ((colours + jitter) * modulation[:, None]).clamp(0.0, 1.0)
    background = (backgrounds.view(-1, 3, 1, 1) + jitter * 0.5).clamp(0.0, 1.0)
    images = mask[:, None] * fill + (1.0 - mask[:, None]) * background
    return images * 2.0 - 1.0


def sample_attributes(count: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Uniform independent attribute indices (the background too) for `count` images."""
    return {name: torch.randint(len(values), (count,), generator=generator)
            for name, values in SCENE_ATTRIBUTES.items()}


def sample_world(count: int, seed: int = 0, style: str = "base") -> tuple[Tensor, list[str], dict[str, Tensor]]:
    """`count` images of the world with their prompts and attribute indices, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    attributes = sample_attributes(count, generator)
    images = render(attributes, generator, style)
    prompts = [make_prompt({k: v[i] for k, v in attributes.items()}) for i in range(count)]
    return images, prompts, attributes


def render_prompts(prompts: list[str], seed: int = 0, style: str = "base") -> Tensor:
    """Real images for given prompts (one per prompt, seeded; backgrounds drawn): the world's answer to each."""
    generator = torch.Generator().manual_seed(seed)
    parsed = [parse_prompt(p) for p in prompts]
    attributes = {name: torch.tensor([p[name] for p in parsed]) for name in ATTRIBUTES}
    attributes["background"] = torch.randint(len(SCENE_ATTRIBUTES["background"]), (len(prompts),), generator=generator)
    return render(attributes, generator, style)


# Where each texture's marks put their energy in a 32x32 power spectrum (integer frequency indices): dots every
# 2 px at (16, 0), (0, 16) and (16, 16) in equal parts, of which only (16, 16) is read (a straight shape edge
# leaks into the first two, hardly into the corner); stripes along x + y with period 4 on the diagonal (8, 8)
# only; 2-px checks on both diagonals, (8, 8) and (8, 24). A power spectrum does not change when the marks
# shift, so this reading holds at any phase.
SPECTRUM_BANDS = {"dots": ((16, 16),), "diagonal": ((8, 8), (24, 24)),
                  "antidiagonal": ((8, 24), (24, 8))}


def texture_spectrum(images: Tensor) -> Tensor:
    """Per image, the share of its fine-structure power (what a 3x3 box blur removes, channels summed) in each
    of SPECTRUM_BANDS' bands, and that power's mean square: (B, 4) = dots, diagonal, antidiagonal, energy."""
    x = images.float().clamp(-1.0, 1.0)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    residual = (x - blurred).sum(dim=1)
    power = torch.fft.fft2(residual).abs().pow(2)
    total = power.flatten(1).sum(1).clamp_min(1e-12)
    shares = [sum(power[:, u, v] for u, v in band) / total for band in SPECTRUM_BANDS.values()]
    return torch.stack([*shares, residual.pow(2).flatten(1).mean(1)], dim=1)


def read_texture(images: Tensor, solid_energy: float = 2e-3) -> Tensor:
    """A classifier-free reading of each image's texture (ATTRIBUTES['texture'] indices) from its spectrum:
    solid when the fine structure is weak or has no texture band; else dotted, striped (one diagonal) or
    checkered (both), by the strongest band. The instrument's cross-check on its texture head."""
    spectrum = texture_spectrum(images)
    dots, diagonal, antidiagonal, energy = spectrum.unbind(1)
    checks = torch.minimum(diagonal, antidiagonal) * 2.0
    stripes = (diagonal - antidiagonal).clamp_min(0.0) + (antidiagonal - diagonal).clamp_min(0.0)
    scores = torch.stack([torch.full_like(dots, 0.02), stripes, 3.0 * dots, checks], dim=1)
    reading = scores.argmax(dim=1)
    return torch.where(energy < solid_energy, torch.zeros_like(reading), reading)
