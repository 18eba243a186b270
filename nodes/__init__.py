"""ComfyUI nodes (thin glue over trainer/); importable without ComfyUI so CI can check their schemas."""

from .dmd_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
