"""Command line: `dmd-distill --config run.toml [--key value ...]` and `dmd-sample`. Parsing only."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .config import KEYS, ConfigError, load_config, shown_default


def _distill_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmd-distill",
        description="Distil a diffusion teacher into a few-step student with Decoupled DMD. Every config key "
                    "is also a flag (--key value) that overrides the TOML file.")
    parser.add_argument("--config", help="kohya-style TOML file (sections are cosmetic)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config as TOML and exit")
    for name, f in KEYS.items():
        choices = f.metadata["choices"]
        extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
        text = f"{f.metadata['help']}{extra} Default: {shown_default(name)}."
        parser.add_argument(f"--{name}", dest=name, default=None, metavar="VALUE", help=text.replace("%", "%%"))
    return parser


def distill_main(argv: list[str] | None = None) -> int:
    parser = _distill_parser()
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name in KEYS if getattr(args, name) is not None}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
    if args.print_config:
        print(config.to_toml())
        return 0
    _setup_logging()
    from .api import distill
    from .loop import TrainerCallbacks, TrainingFailed
    from .outputs import is_disk_full

    stop = StopOnInterrupt()
    log = logging.getLogger("decoupled_dmd")
    try:
        path = distill(config, TrainerCallbacks(should_stop=stop))
    except ConfigError as error:
        parser.error(str(error))
    except TrainingFailed as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        if not is_disk_full(error):
            raise
        log.error("%s", error.strerror)
        return 1
    if path is None:
        log.info("nothing written: stopped before the first update")
        return 130
    log.info("student written to %s", path)
    return 130 if stop.requested else 0


def sample_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmd-sample", description="Sample a distilled student (or its teacher).")
    parser.add_argument("--model", required=True,
                        help="a distilled all-in-one checkpoint, or the base model: a single-file .safetensors "
                             "checkpoint, a diffusers folder, a hub id or builtin:<tiny>")
    parser.add_argument("--student", help="student LoRA / UNet .safetensors written by dmd-distill, applied to --model")
    parser.add_argument("--tokenizer_path", default="", help="CLIP tokenizer folder for single-file checkpoints")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt_file", help="text file with one prompt per line")
    parser.add_argument("--timesteps", help="student timesteps, e.g. 999,749,499,249 (default: from the file)")
    parser.add_argument("--teacher_steps", type=int, help="sample the teacher with CFG in this many steps instead")
    parser.add_argument("--guidance_scale", type=float, help="teacher CFG scale (default: family default)")
    parser.add_argument("--resolution", help="1024 or 1024,768 (width,height); default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="samples.png", help="PNG grid to write")
    args = parser.parse_args(argv)
    _setup_logging()
    from .api import apply_student, load_teacher, read_prompts, sample_images
    from .config import _parse_resolution
    from .outputs import save_image_grid

    try:
        prompts = args.prompt + read_prompts(args.prompt_file or "")
        resolution = None
        if args.resolution:
            width, height = _parse_resolution(args.resolution)
            resolution = (height, width)
    except ConfigError as error:
        parser.error(str(error))
    if not prompts:
        parser.error("give at least one --prompt or a --prompt_file")
    try:
        adapter = load_teacher(args.model, tokenizer_path=args.tokenizer_path)
        timesteps = apply_student(adapter, args.student or args.model) if (args.student or not args.teacher_steps) \
            else None
    except ConfigError as error:
        parser.error(f"{error} (give --student with a distilled file, a distilled checkpoint as --model, or "
                     "--teacher_steps N to sample the teacher)")
    if args.timesteps:
        from .schedules import parse_student_timesteps

        try:
            timesteps = parse_student_timesteps(args.timesteps, "--timesteps")
        except ValueError as error:
            parser.error(str(error))
    images = sample_images(adapter, prompts, args.seed, timesteps=timesteps, teacher_steps=args.teacher_steps,
                           guidance_scale=args.guidance_scale, resolution=resolution)
    print(save_image_grid(images, args.output))
    return 0


class StopOnInterrupt:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once (last save is kept)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        """Put back the SIGINT handler that was there before (a host process keeps its own)."""
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logging.getLogger("decoupled_dmd").warning("interrupt: stopping after this step and saving a resumable state")

    def __call__(self) -> bool:
        return self.requested


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(distill_main())
