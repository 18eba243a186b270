"""The evaluation protocol: which prompts a student trains on, which are held out, and which noise seeds
choose settings and which report them (issue 27).

- **Prompts.** A world's training prompts and its held-out prompts are disjoint; on the texture world the 16
  held-out combinations (every colour with every texture, one shape each) are never trained on, while every
  attribute value is trained in other combinations (`texture.training_prompts`).
- **Seeds.** Three disjoint ranges. Training seeds (a run's `seed`: its sampled noises, prompts and re-noise
  levels, and the regression loss's teacher pairs, which draw from the training prompts only); validation
  seeds (every choice: recipe, stop, defaults, the demo's settings); test seeds (reported figures only,
  computed once per shipped recipe, never used to choose).
- **One split, fixed seeds.** A split's evaluation draws its noises from `noise_seed`, and its reference (the
  teacher's 50-step CFG samples, the distillation target) from `reference_seed`; the other split's reference
  is this one's noise-floor set. Every row of one table has the same n.

`Split.record()` is what `metrics.json` and the benchmark's JSON carry, so a script can check the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINING_SEEDS = range(0, 10_000)
VALIDATION_SEEDS = range(10_000, 20_000)
TEST_SEEDS = range(20_000, 30_000)
SEED_RANGES = {"training": TRAINING_SEEDS, "validation": VALIDATION_SEEDS, "test": TEST_SEEDS}


@dataclass(frozen=True)
class Split:
    """One evaluation split: where its noises and its reference come from."""

    name: str
    noise_seed: int       # the evaluated rows' starting noises (and the student's re-noising draws)
    reference_seed: int   # the teacher's 50-step CFG samples every row is compared with

    def __post_init__(self):
        seeds = SEED_RANGES[self.name]
        for field in ("noise_seed", "reference_seed"):
            value = getattr(self, field)
            if value not in seeds:
                raise ValueError(f"{self.name} split: {field} {value} is outside the {self.name} seeds "
                                 f"{seeds.start}..{seeds.stop - 1}")

    def record(self, prompts: list[str], training_prompts: list[str], rows: dict[str, int]) -> dict:
        """The protocol as written into results: the split, its seeds, the evaluated and trained prompts
        (distinct, in order) and n per row."""
        evaluated = list(dict.fromkeys(prompts))
        return {"split": self.name, "noise_seed": self.noise_seed, "reference_seed": self.reference_seed,
                "seed_ranges": {k: [v.start, v.stop - 1] for k, v in SEED_RANGES.items()},
                "evaluated_prompts": evaluated, "training_prompts": list(training_prompts),
                "held_out": not set(evaluated) & set(training_prompts), "n_per_row": rows}


VALIDATION = Split("validation", noise_seed=10_001, reference_seed=10_000)
TEST = Split("test", noise_seed=20_001, reference_seed=20_000)
SPLITS = {"validation": VALIDATION, "test": TEST}


def get_split(name: str) -> Split:
    if name not in SPLITS:
        raise ValueError(f"unknown evaluation split {name!r}; choose validation (for every choice) or test "
                         "(reported figures, once per shipped recipe)")
    return SPLITS[name]


def check_training_seed(seed: int) -> int:
    """A run's `seed` must be a training seed: the validation and test noises stay unseen by training."""
    if seed not in TRAINING_SEEDS:
        raise ValueError(f"training seed {seed} is outside the training seeds {TRAINING_SEEDS.start}.."
                         f"{TRAINING_SEEDS.stop - 1} (validation and test seeds are kept for evaluation)")
    return seed


def check_protocol(record: dict) -> list[str]:
    """What is wrong with a results file's protocol record (an empty list: nothing)."""
    problems = []
    if not record.get("held_out"):
        problems.append("the evaluated prompts overlap the training prompts")
    seeds = SEED_RANGES.get(record.get("split"), range(0))
    for field in ("noise_seed", "reference_seed"):
        if record.get(field) not in seeds:
            problems.append(f"{field} {record.get(field)} is not a {record.get('split')} seed")
    counts = set(record.get("n_per_row", {}).values())
    if len(counts) > 1:
        problems.append(f"rows have different n: {record['n_per_row']}")
    return problems
