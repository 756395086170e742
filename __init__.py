"""comfyui-mace: MACE mass concept erasure as ComfyUI nodes (GPL-3.0).

ComfyUI imports this file from custom_nodes/; it only exposes the V3 entrypoint. The algorithms
live in ``mace_ops`` (plain torch), the ComfyUI adapters in ``nodes``. Outside ComfyUI (pytest
collects this folder as a package, scripts import ``mace_ops``) there is no ``comfy_api`` and
nothing is exported.
"""
import importlib.util

# Served at /extensions/<pack folder>/: web/docs/<node_id>.md are the nodes' help pages (the frontend's
# node "Info" panel); written by scripts/build_node_docs.py.
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
