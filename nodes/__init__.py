"""ComfyUI nodes (thin glue over trainer/). The node suite lands with the ComfyUI issue; until then the pack
registers no nodes, so cloning it into custom_nodes/ is harmless."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
