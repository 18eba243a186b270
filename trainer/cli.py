"""Command line: `dmd-distill --config run.toml [--key value ...]` and `dmd-sample`. Parsing only."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import torch

from .config import BOUNDS, KEYS, SAMPLING_SEED, ConfigError, load_config, shown_default


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter without breaks at hyphens, so names like builtin:tiny-flow stay whole."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ShortErrorParser(argparse.ArgumentParser):
    """An error is the one line that matters and where to find the rest, not the whole usage block first
    (dmd-distill has about 80 options: argparse's usage ran to 40 lines above the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists every option)\n")


def _distill_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        prog="dmd-distill", formatter_class=_HelpFormatter,
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
    except KeyboardInterrupt:  # the second Ctrl-C (or signal): stop at once
        log.warning("stopped at once; the last saved state and student are kept, nothing else was written")
        return stop.exit_code
    except OSError as error:
        if not is_disk_full(error):
            raise
        log.error("%s", error.strerror)
        return 1
    finally:
        stop.restore()
    if path is None:
        log.info("nothing written: stopped before the first update")
        return stop.exit_code
    log.info("student written to %s", path)
    return stop.exit_code if stop.requested else 0


def sample_main(argv: list[str] | None = None) -> int:
    parser = ShortErrorParser(prog="dmd-sample", description="Sample a distilled student (or its teacher).")
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
    parser.add_argument("--force", action="store_true",
                        help="apply --student to a model other than the base it was distilled from (its metadata "
                             "records the base's sha256), such as a fine-tune of that base")
    args = parser.parse_args(argv)
    try:
        prompts, resolution, typed_timesteps, saved_timesteps = _check_sample_args(args)
    except ConfigError as error:
        parser.error(str(error))
    _setup_logging()
    from .api import apply_student, load_teacher, sample_images
    from .outputs import save_image_grid
    from .schedules import check_student_timesteps

    try:
        adapter = load_teacher(args.model, tokenizer_path=args.tokenizer_path)
        timesteps = None
        if args.student or not args.teacher_steps:
            timesteps = apply_student(adapter, args.student or args.model, force=args.force)
        timesteps = typed_timesteps or timesteps
        if timesteps is not None:
            try:
                check_student_timesteps(adapter.schedule, timesteps, -1)
            except ValueError as error:
                raise ConfigError(f"{'--timesteps' if typed_timesteps else saved_timesteps}: {error}") from None
    except ConfigError as error:
        parser.error(f"{error} (give --student with a distilled file, a distilled checkpoint as --model, or "
                     "--teacher_steps N to sample the teacher)")
    images = sample_images(adapter, prompts, args.seed, timesteps=timesteps, teacher_steps=args.teacher_steps,
                           guidance_scale=args.guidance_scale, resolution=resolution)
    if not bool(torch.isfinite(images).all()):
        logging.getLogger("decoupled_dmd").error("the samples hold NaN or inf (a damaged model or student?); "
                                                 "nothing written")
        return 1
    from .outputs import is_disk_full

    try:
        written = save_image_grid(images, args.output)
    except OSError as error:
        if not is_disk_full(error):
            raise
        logging.getLogger("decoupled_dmd").error("%s", error.strerror or error)
        return 1
    print(written)
    return 0


def _check_sample_args(args) -> tuple[list[str], tuple[int, int] | None, list[int] | None, str]:
    """Everything dmd-sample is given, checked before a model loads: prompts, numbers, paths, the output file, a
    student's metadata. Returns (prompts, (height, width) or None, typed timesteps or None, where saved ones
    come from)."""
    import math
    import os

    from .api import read_prompts, teacher_source_problem
    from .config import _parse_resolution, portable_name_problem, resolution_problem
    from .formats import read_student_metadata, student_timesteps
    from .schedules import parse_student_timesteps

    prompts = args.prompt + read_prompts(args.prompt_file or "")
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompt_file")
    resolution = None
    if args.resolution:
        width, height = _parse_resolution(args.resolution)
        problem = resolution_problem(width, height)
        if problem:
            raise ConfigError(f"--resolution: {problem}")
        resolution = (height, width)
    if args.teacher_steps is not None and not 1 <= args.teacher_steps <= 1000:
        raise ConfigError(f"--teacher_steps {args.teacher_steps}: use 1 .. 1000 (50 is typical)")
    scales, scale = BOUNDS["guidance_scale"], args.guidance_scale
    if scale is not None and not (math.isfinite(scale) and scales.contains(scale)):
        raise ConfigError(f"--guidance_scale {args.guidance_scale}: use a finite scale in {scales.low:g} .. "
                          f"{scales.high:g} (SDXL: 5 .. 12)")
    if not SAMPLING_SEED.contains(args.seed):
        raise ConfigError(f"--seed {args.seed}: use {SAMPLING_SEED.low} .. {SAMPLING_SEED.high}")
    for flag, path in (("--model", args.model), ("--student", args.student)):
        problem = path and teacher_source_problem(path)
        if problem:
            raise ConfigError(problem.replace("pretrained_model_name_or_path", flag))
    output = os.path.abspath(args.output)
    problem = portable_name_problem(os.path.basename(output))
    if problem or not output.lower().endswith(".png"):
        raise ConfigError(f"--output {args.output!r}: {problem or 'write a .png file name'}")
    folder = os.path.dirname(output)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK) or os.path.isdir(output):
            raise PermissionError(13, "not writable")
    except OSError as error:
        raise ConfigError(f"--output {args.output!r}: cannot write there ({error.strerror or error}); choose "
                          "another file") from None
    typed = None
    if args.timesteps:
        try:
            typed = parse_student_timesteps(args.timesteps, "--timesteps")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    saved_from = args.student or args.model
    if typed is None and (args.student or not args.teacher_steps) and os.path.isfile(saved_from):
        student_timesteps(read_student_metadata(saved_from))  # garbage or missing metadata fails here, by name
    return prompts, resolution, typed, f"{os.path.basename(saved_from)}'s decoupled_dmd.student_timesteps"


class StopOnInterrupt:
    """First Ctrl-C (SIGINT), SIGTERM or SIGHUP: finish the current step, save, exit. A second one: stop at once
    (the last save is kept). SIGTERM is what machines send (docker stop, Slurm, a closing terminal sends SIGHUP);
    `exit_code` is the shell's convention for the signal that came, 128 + its number (130 for Ctrl-C)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.requested = False
        self.signal_number: int | None = None
        self._previous = {}
        for number in self.SIGNALS:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except (ValueError, OSError):  # not the main thread, or a signal this platform will not let us catch
                pass

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGINT)

    def restore(self) -> None:
        """Put back the handlers that were there before (a host process keeps its own)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_number = True, signum
        name = signal.Signals(signum).name
        logging.getLogger("decoupled_dmd").warning("%s: stopping after this step and saving a resumable state "
                                                   "(send it again to stop at once)", name)

    def __call__(self) -> bool:
        return self.requested


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(distill_main())
