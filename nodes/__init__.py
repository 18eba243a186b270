"""ComfyUI nodes (thin glue over trainer/); importable without ComfyUI so CI can check their schemas."""

from . import runtime
from .dmd_nodes import CURVE_HISTORY, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

runtime.register_routes(CURVE_HISTORY)  # inside ComfyUI only: the live curves after a page (re)load

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
