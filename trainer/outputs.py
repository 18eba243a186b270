"""Writing files so that nothing is lost: atomic writes, free names, preview grids."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import tempfile
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError

_HELD_LOCKS: dict[str, list] = {}  # real path -> [open lock file, depth]: re-entrant within a process
LOCK_NAME = ".decoupled_dmd.lock"


@contextlib.contextmanager
def own_output_dir(folder: str):
    """Hold `folder` for one run: a second run (another process, or another run in this one) is refused with a
    message. The OS releases the lock when the process ends, so a crashed run never leaves it stuck; a run that
    ends removes the lock file."""
    key = os.path.realpath(folder)
    entry = _HELD_LOCKS.get(key)
    if entry is None:
        created = not os.path.exists(folder)
        entry = _HELD_LOCKS[key] = [_acquire(folder), 0, created]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD_LOCKS[key]
            handle = entry[0]
            try:
                os.remove(handle.name)  # before unlocking: a waiting run then locks a fresh file (see _acquire)
            except OSError:
                pass
            _os_lock(handle, take=False)
            handle.close()
            if entry[2]:
                try:
                    os.rmdir(folder)  # a run that wrote nothing leaves no empty folder behind
                except OSError:
                    pass


def _acquire(folder: str):
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(100):
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.path.isdir(folder):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            handle = open(path, "a+", encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"output_dir {folder!r} cannot be used ({error.strerror or error}); give a folder "
                              "this user can create and write to") from None
        if not _os_lock(handle, take=True):
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"output_dir {folder!r} is in use by another run ({owner}); wait for it to finish, "
                              "or give this run its own output_dir")
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except OSError:
            same = False
        if same:  # not a file the previous owner removed while this one waited for it
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            return handle
        _os_lock(handle, take=False)
        handle.close()
    raise ConfigError(f"output_dir {folder!r}: could not take its lock file {LOCK_NAME}; is something removing it?")


def _os_lock(handle, take: bool) -> bool:
    """Take (without waiting) or drop the OS lock on an open lock file; False if another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK if take else msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), (fcntl.LOCK_EX | fcntl.LOCK_NB) if take else fcntl.LOCK_UN)
        return True
    except OSError:
        return False


def free_path(path: str) -> str:
    """`path` if nothing is there, else the first `<stem>_00001_<ext>` that is free (ComfyUI's counter)."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    for counter in range(1, 100000):
        candidate = f"{stem}_{counter:05d}_{ext}"
        if not os.path.exists(candidate):
            return candidate
    raise FileExistsError(f"{path!r}: no free counter name left; clean up the folder")


STAGING_PREFIX, STAGING_SUFFIX = ".partial-", ".tmp"  # loaders list .safetensors/.png, never .tmp


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()  # what open() would give: temporary files start as 0600
DIR_MODE = 0o777 & ~_process_umask()  # what mkdir() would give


def remove_stale_staging(folder: str) -> list[str]:
    """Delete temporaries a killed writer left in `folder` (call only while this run owns the folder)."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(STAGING_PREFIX) and name.endswith(STAGING_SUFFIX):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
                except OSError:
                    pass
    return removed


# torch.save's C++ writer reports a full disk as a failed stream, never as ENOSPC
TORCH_WRITE_FAILURES = ("basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed writing")
LOW_DISK_BYTES = 64 * 2**20


def is_disk_full(error: BaseException, folder: str | None = None) -> bool:
    """ENOSPC, also as libraries re-raise it (safetensors: 'No space left on device (os error 28)'), and torch's
    failed-stream errors when `folder`'s disk has (almost) no free space left."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) \
            or "No space left on device" in text or "os error 28" in text:
        return True
    if folder and any(marker in text for marker in TORCH_WRITE_FAILURES):
        try:
            return shutil.disk_usage(folder).free < LOW_DISK_BYTES
        except OSError:
            return False
    return False


def disk_full_error(path: str, kept: str) -> OSError:
    return OSError(errno.ENOSPC, f"disk full while writing {path!r}; {kept}: free space or choose another folder")


def atomic_write(path: str, write: Callable[[str], object], overwrite: bool = False) -> str:
    """Call `write(staging)` on a temporary file in the target folder, then move it to `path`.

    A failed or interrupted write (a full disk, Ctrl-C) leaves no file under the final name and removes the
    temporary one. An existing file is replaced only if `overwrite`; otherwise a counter is added to the name,
    claimed with a hard link so that two writers never take the same name. Returns the path written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=os.path.splitext(path)[1] + STAGING_SUFFIX,
                                       dir=folder)
    os.close(handle)
    try:
        try:
            write(staging)
            os.chmod(staging, FILE_MODE)
        except Exception as error:
            if is_disk_full(error, folder):
                raise disk_full_error(path, "nothing was written under that name") from error
            raise
        if overwrite:
            os.replace(staging, path)
            return path
        while True:
            target = free_path(path)
            try:
                os.link(staging, target)  # fails if the name was taken meanwhile: never clobbers
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: a plain rename after the check
                os.replace(staging, target)
                return target
            os.remove(staging)
            return target
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def image_grid(images: Tensor, columns: int | None = None):
    """(B, 3, H, W) images in [0, 1] as one PIL image: a grid of about square shape (or `columns` wide)."""
    from PIL import Image

    count = images.shape[0]
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    height, width = images.shape[-2:]
    grid = torch.zeros(3, rows * height, columns * width)
    for index, image in enumerate(images.float().cpu()):
        row, column = divmod(index, columns)
        grid[:, row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def save_image_grid(images: Tensor, path: str, columns: int | None = None) -> str:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid, atomically."""
    grid = image_grid(images, columns)
    return atomic_write(path, lambda staging: grid.save(staging, format="PNG"), overwrite=True)


METRICS_FILE = "metrics.jsonl"


def logging_dir(config) -> str:
    """The run's log folder: `logging_dir`, or <output_dir>/logs."""
    return config.logging_dir or os.path.join(config.output_dir, "logs")


class MetricsLog:
    """A run's metrics.jsonl (one strict JSON line per update): its one writer and its one reader."""

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, METRICS_FILE)

    @classmethod
    def of(cls, config) -> "MetricsLog":
        return cls(logging_dir(config))

    def append(self, record: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(metrics_line(record) + "\n")

    def read(self) -> list[dict]:
        """Every record so far ([] before the first update)."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def last(self, key: str, default: float) -> float:
        """`key` of the newest record, or `default` (no record yet, or a null there)."""
        records = self.read()
        value = records[-1].get(key) if records else None
        return default if value is None else float(value)


def metrics_line(record: dict) -> str:
    """One line of metrics.jsonl in strict JSON: a non-finite number (a diverging run logs them) is written as
    null, since NaN and Infinity are not JSON and strict readers (browsers, jq, pandas) reject the file."""
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in record.items()}
    return json.dumps(clean, allow_nan=False)
