"""Writing files so that nothing is lost: atomic writes, free names, preview grids."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from typing import Callable

import torch
from torch import Tensor


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


def atomic_write(path: str, write: Callable[[str], object], overwrite: bool = False) -> str:
    """Call `write(staging)` on a temporary file in the target folder, then move it to `path`.

    A failed or interrupted write (a full disk, Ctrl-C) leaves no file under the final name and removes the
    temporary one. An existing file is replaced only if `overwrite`; otherwise a counter is added to the name,
    claimed with a hard link so that two writers never take the same name. Returns the path written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        try:
            write(staging)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(error.errno, f"disk full while writing {path!r}; nothing was written under that name: "
                                           "free space or choose another folder") from error
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


def save_image_grid(images: Tensor, path: str, columns: int | None = None) -> str:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid, atomically."""
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
    return atomic_write(path, lambda staging: Image.fromarray(array).save(staging, format="PNG"), overwrite=True)
