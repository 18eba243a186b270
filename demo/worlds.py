"""The demo's two worlds, behind one interface the demo, the benchmark and the metrics use.

- `texture` (default): the procedural texture world (texture.py) with an SD-style epsilon teacher on SDXL's
  noise process and student grid; its CFG effect reaches clean levels, where the paper's claim lives.
- `mnist`: handwritten digits with a flow-matching teacher; its guidance acts almost only at noisy levels.

A world names its shipped teacher, classifier and reference, its prompts (for training and evaluation), the
attributes a prompt asks for (one classifier head each), real images for a list of prompts, and the student
grid with SDXL's signal-to-noise ratios.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import models


def sdxl_student_timesteps(steps: int) -> list[int]:
    """DMD2's SDXL student grids: 999 / 999, 499 / 999, 749, 499, 249; uniform for other step counts."""
    return [999 - round(1000 * i / steps) for i in range(steps)]


def flow_timesteps_matching_sdxl(steps: int, sdxl_timesteps: list[int] | None = None) -> list[int]:
    """Flow timesteps with the signal-to-noise ratios of DMD2's SDXL student grid (999, 749, 499, 249).

    A VP timestep with alpha_bar has SNR alpha_bar / (1 - alpha_bar); a flow level t has SNR t^2 / (1 - t)^2,
    so t = sqrt(SNR) / (1 + sqrt(SNR)) and the flow timestep is (1 - t) * 1000. The first step stays 999
    (pure noise): SDXL's 999 is not quite pure noise, a flow model's is.
    """
    from ..trainer.schedules import DiscreteVPSchedule

    if sdxl_timesteps is None:  # DMD2's SDXL grids: 999 / 999, 499 / 999, 749, 499, 249 (uniform otherwise)
        sdxl_timesteps = sdxl_student_timesteps(steps)
    vp = DiscreteVPSchedule.scaled_linear()
    out = []
    for index, timestep in enumerate(sdxl_timesteps):
        alpha_bar = float(vp.alphas_cumprod[timestep])
        root = (alpha_bar / (1.0 - alpha_bar)) ** 0.5
        level = root / (1.0 + root)
        out.append(999 if index == 0 else int(round((1.0 - level) * 1000)))
    return out


def shifted_flow_timesteps(steps: int, shift: float = 3.0) -> list[int]:
    """The uniform N-step flow grid with SD3 / Z-Image's timestep shift (`schedules.shift_sigma`)."""
    from ..trainer.schedules import shift_sigma

    return [min(999, int(round(shift_sigma(1.0 - index / steps, shift) * 1000))) for index in range(steps)]


class World:
    name = ""
    teacher_dir = ""
    classifier_file = ""
    reference_file = ""
    classifier_architecture: type = models.DigitClassifier
    attributes: dict[str, tuple[str, ...]] = {}
    settings: dict = {}  # TrainConfig values this world's runs use over experiment.BASE_SETTINGS
    # the teacher's sampler in the demo's comparison rows: a solvers.SOLVERS name, or None for the trainer's own
    # cfg_sample (Euler in x0 space, which is flow matching's Euler exactly)
    solver: str | None = None

    def prompts(self) -> list[str]:
        """The prompts students are trained on."""
        raise NotImplementedError

    def grid_prompts(self) -> list[str]:
        """One prompt per column of the demo grid (and per group of the evaluation set)."""
        raise NotImplementedError

    def column_title(self, prompt: str) -> str:
        raise NotImplementedError

    def labels(self, prompts: list[str]) -> dict[str, Tensor]:
        """Class index each prompt asks for, per attribute."""
        raise NotImplementedError

    def real_images(self, prompts: list[str], seed: int = 0) -> Tensor:
        """Real images answering `prompts` (one each), (N, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    def student_timesteps(self, steps: int) -> list[int]:
        raise NotImplementedError

    def evaluation_prompts(self, per_prompt: int) -> list[str]:
        """Each grid prompt `per_prompt` times, grouped by prompt."""
        return [prompt for prompt in self.grid_prompts() for _ in range(per_prompt)]

    def spec(self) -> str | dict:
        """What `get_world` rebuilds this world from (a worker process gets it)."""
        return self.name

    def load_classifier(self):
        return models.load_classifier(self.classifier_file, self.classifier_architecture)

    def teacher_info(self) -> dict:
        return models.teacher_info(self.teacher_dir)


class MnistWorld(World):
    name = "mnist"
    teacher_dir = models.TEACHER_DIR
    classifier_file = models.CLASSIFIER_FILE
    reference_file = models.REFERENCE_FILE
    classifier_architecture = models.DigitClassifier

    @property
    def attributes(self):
        from .data import DIGIT_WORDS

        return {"digit": DIGIT_WORDS}

    def prompts(self) -> list[str]:
        from .data import demo_prompts

        return demo_prompts()

    def grid_prompts(self) -> list[str]:
        return self.prompts()

    def column_title(self, prompt: str) -> str:
        return prompt.split()[-1]

    def labels(self, prompts: list[str]) -> dict[str, Tensor]:
        from .data import prompt_label

        return {"digit": torch.tensor([prompt_label(p) for p in prompts])}

    def real_images(self, prompts: list[str], seed: int = 0) -> Tensor:
        """Shipped held-out test digits of the asked labels (cycled when a label is asked more often)."""
        images, labels = _heldout()
        wanted = self.labels(prompts)["digit"]
        generator = torch.Generator().manual_seed(seed)
        out = []
        for label in range(10):
            rows = (wanted == label).nonzero().flatten()
            pool = (torch.from_numpy(labels) == label).nonzero().flatten()
            if len(rows):
                pool = pool[torch.randperm(len(pool), generator=generator)]
                out.append((rows, pool[torch.arange(len(rows)) % len(pool)]))
        result = torch.empty(len(prompts), *images.shape[1:])
        for rows, pick in out:
            result[rows] = torch.from_numpy(images[pick.numpy()])
        return result

    def student_timesteps(self, steps: int) -> list[int]:
        return flow_timesteps_matching_sdxl(steps)


class TextureWorld(World):
    """The texture world in a `style` (texture.STYLES), with its teacher and reference: by default the shipped
    base ones; the fine-tune benchmark builds a `vega` teacher and reference of its own and names them."""

    name = "texture"
    solver = "dpmpp_2m"  # the closest to the 50-step teacher at 4 to 16 calls (docs/evidence.md)
    classifier_file = models.TEXTURE_CLASSIFIER_FILE
    classifier_architecture = models.TextureClassifier
    # Eq. 7's targets: the real images' per-image mean and variance (4,000 images of seed 99)
    settings = {"mean_variance_target_mean": -0.03, "mean_variance_target_var": 0.164}

    def __init__(self, style: str = "base", teacher_dir: str | None = None, reference_file: str | None = None):
        from .texture import get_style

        get_style(style)  # an unknown style fails here, naming the known ones
        self.style = style
        self.teacher_dir = teacher_dir or models.TEXTURE_TEACHER_DIR
        self.reference_file = models.TEXTURE_REFERENCE_FILE if reference_file is None else reference_file

    def spec(self) -> dict:
        return {"name": self.name, "style": self.style, "teacher_dir": self.teacher_dir,
                "reference_file": self.reference_file}

    @property
    def attributes(self):
        from .texture import ATTRIBUTES

        return dict(ATTRIBUTES)

    def prompts(self) -> list[str]:
        """The 32 training combinations; the 16 held-out ones (`grid_prompts`) are never trained on."""
        from .texture import training_prompts

        return training_prompts()

    def grid_prompts(self) -> list[str]:
        from .texture import evaluation_prompts

        return evaluation_prompts()

    def column_title(self, prompt: str) -> str:
        from .texture import parse_prompt

        chosen = parse_prompt(prompt)
        return "\n".join(self.attributes[name][chosen[name]] for name in ("colour", "texture", "shape"))

    def labels(self, prompts: list[str]) -> dict[str, Tensor]:
        from .texture import parse_prompt

        parsed = [parse_prompt(p) for p in prompts]
        return {name: torch.tensor([p[name] for p in parsed]) for name in self.attributes}

    def real_images(self, prompts: list[str], seed: int = 0) -> Tensor:
        from .texture import render_prompts

        return render_prompts(prompts, seed, self.style)

    def student_timesteps(self, steps: int) -> list[int]:
        return sdxl_student_timesteps(steps)


WORLDS = {"texture": TextureWorld, "mnist": MnistWorld}


def get_world(name: str | dict | World = "texture") -> World:
    """The world called `name` (texture or mnist), or a ValueError naming both. A dict (`World.spec()`, which
    worker processes receive) gives the name and the world's own arguments, e.g. a texture style and teacher."""
    if isinstance(name, World):
        return name
    if isinstance(name, dict):
        arguments = dict(name)
        return WORLDS[arguments.pop("name")](**arguments)
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]()


_HELDOUT: tuple | None = None


def _heldout():
    global _HELDOUT
    if _HELDOUT is None:
        from .data import load_heldout

        images, labels = load_heldout()
        _HELDOUT = (images, labels)
    return _HELDOUT
