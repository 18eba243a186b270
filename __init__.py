"""ComfyUI-DecoupledDMD: Decoupled DMD few-step distillation as a ComfyUI node pack and a pip package.

ComfyUI imports this folder from custom_nodes/ under its folder name, where a top-level `nodes` module already
exists: every import in the pack is relative. Nothing here imports ComfyUI; the node classes do so lazily.
"""

if __package__:
    from . import demo  # noqa: F401 - registers the built-in trained teachers before any config is read
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # pytest imports this file on its own (module "__init__", no package) when the checkout's folder name is not
    # an identifier, e.g. ComfyUI-DecoupledDMD: there is no package to register nodes from then.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# The frontend extension (live training curves on the Train node), served by ComfyUI at /extensions/<folder>/.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
