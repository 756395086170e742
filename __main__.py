"""Command line of the pack (see ``headless/cli.py``):

    python -m comfyui_mace run WORKFLOW.json [--set NODE.FIELD=VALUE ...]   # folder importable
    python path/to/comfyui-mace run WORKFLOW.json [...]                     # any folder name
    python path/to/comfyui-mace check WORKFLOW.json

In script mode (``python path/to/pack``) the folder is loaded as the package ``comfyui_mace``
with ``importlib`` so the relative imports work whatever the folder is called.  Its
``__init__.py`` is not executed there: it would import the ComfyUI nodes (and ComfyUI's
``folder_paths``) before the runner has chosen the ComfyUI checkout and directories.
"""
import sys

if __package__:
    from .headless.cli import main
else:
    import importlib
    import importlib.util
    import os

    _pack = os.path.dirname(os.path.abspath(__file__))
    # sys.path[0] is the pack folder: its nodes/ would shadow ComfyUI's nodes.py.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _pack]
    _name = "comfyui_mace"
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            _name, os.path.join(_pack, "__init__.py"), submodule_search_locations=[_pack])
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
    main = importlib.import_module(_name + ".headless.cli").main

if __name__ == "__main__":
    sys.exit(main())
