"""One copy of the pack per ComfyUI process: the first one loaded wins, any other says so and stands aside.

A creator can end up with two copies in custom_nodes/ (the Registry's `decoupled-dmd` beside an older git clone
`ComfyUI-DecoupledDMD`, or a backup folder). ComfyUI imports each under its own module name, so module state is not
shared: the claim lives in `sys.modules`, which every import in the process sees. Nothing here imports torch or
ComfyUI (the top-level __init__ asks before it imports the nodes, whose import registers a route).
"""

from __future__ import annotations

import logging
import os
import sys
import types

CLAIM = "decoupled_dmd._loaded_copy"  # a sys.modules entry: no real module has this name
logger = logging.getLogger(__name__)


def claim(folder: str) -> str | None:
    """Claim this process for the copy in `folder`. Returns None when it is the first (or the same folder again),
    else the folder of the copy that was loaded first; this copy should then register nothing."""
    here = os.path.realpath(folder)
    first = sys.modules.get(CLAIM)
    if first is None:
        marker = types.ModuleType(CLAIM, "the folder of the Decoupled DMD pack copy that this process loaded first")
        marker.folder = here
        sys.modules[CLAIM] = marker
        return None
    return None if first.folder == here else first.folder


def stand_aside(folder: str, first: str) -> None:
    """The one log line of a copy that is not loaded."""
    logger.warning("[Decoupled DMD] another copy of this pack is already loaded from %s; the copy in %s is skipped "
                   "(its nodes and web extension are not registered). Delete or move one of the two folders out of "
                   "custom_nodes.", first, os.path.realpath(folder))
