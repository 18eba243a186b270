"""ComfyUI-DecoupledDMD: Decoupled DMD few-step distillation as a ComfyUI node pack and a pip package.

ComfyUI imports this folder from custom_nodes/ under its folder name, where a top-level `nodes` module already
exists: every import in the pack is relative. Nothing here imports ComfyUI; the node classes do so lazily.
"""

# The frontend extension (live training curves on the Train node), served by ComfyUI at /extensions/<folder>/.
WEB_DIRECTORY = "./web"

if __package__:
    from .copies import claim, stand_aside

    _first_copy = claim(__path__[0])
    if _first_copy is None:
        from . import demo  # noqa: F401 - registers the built-in trained teachers before any config is read
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    else:  # a second copy in custom_nodes/: the first one loaded wins; this one registers nothing
        stand_aside(__path__[0], _first_copy)
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY = {}, {}, None
else:
    # pytest imports this file on its own (module "__init__", no package) when the checkout's folder name is not
    # an identifier, e.g. ComfyUI-DecoupledDMD: there is no package to register nodes from then.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
