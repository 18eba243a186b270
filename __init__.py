"""ComfyUI-DecoupledDMD: Decoupled DMD few-step distillation as a ComfyUI node pack and a pip package.

ComfyUI imports this folder from custom_nodes/ under its folder name, where a top-level `nodes` module already
exists: every import in the pack is relative. Nothing here imports ComfyUI; the node classes do so lazily.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
