"""Headless use of the pack: run and lint ComfyUI workflows without the server, erase concepts
from a checkpoint from the command line.

    python -m comfyui_mace run WORKFLOW.json [--set NODE.FIELD=VALUE ...]   # pack importable
    python path/to/comfyui-mace run WORKFLOW.json ...                       # any folder name
    python path/to/comfyui-mace check WORKFLOW.json

Modules: :mod:`.bootstrap` (find, import and initialise ComfyUI with this pack loaded),
:mod:`.ui_to_api` (UI -> API conversion and lints, plain Python), :mod:`.runner` (validate and
execute a prompt with ComfyUI's own executor and a console stub server), :mod:`.cli` (the
command line), :mod:`.erase_checkpoint` (``scripts/mace_demo.py --checkpoint``).

Importing this package imports nothing from ComfyUI or torch; only :func:`.bootstrap.bootstrap`
does.  Relative imports only: the pack folder's name need not be a valid module name.
"""
