"""Find, import and initialise ComfyUI in this process, with this pack loaded (no HTTP server).

:func:`bootstrap` does, in order (like ComfyUI's ``main.py``, minus the server):

* finds a checkout (:func:`find_comfyui`): ``--comfyui PATH``, else ``$COMFYUI_PATH``, else the
  ComfyUI whose ``custom_nodes/`` this pack sits in, else ``~/ComfyUI``; otherwise it raises
  :class:`ComfyUINotFound` whose message says how to point at one;
* applies a torchvision shim only when needed (a CUDA build of torchvision next to a CPU-only
  torch: ``import torchvision`` would fail, and ComfyUI imports it at start-up);
* sets ``args.cpu = True`` only when torch sees no accelerator (CUDA/ROCm, MPS, XPU), so a GPU
  machine keeps ComfyUI's defaults and uses the GPU; ``--base-directory`` /
  ``--output-directory`` become ComfyUI's own ``args`` before ``folder_paths`` is imported;
* imports ``utils.extra_config`` and ``server`` before ``nodes`` (``nodes.py`` puts
  ``<ComfyUI>/comfy`` on ``sys.path``, after which a top-level ``utils`` would be
  ``comfy/utils.py``), with the checkout as the working directory while it imports;
* applies the model paths as ``main.py`` does (``extra_model_paths.yaml``, the output folders as
  checkpoint/LoRA folders) plus ``extra_model_dirs`` (``{"checkpoints": [path, ...]}``);
* runs ``nodes.init_extra_nodes`` (built-in extra nodes; the install's custom nodes unless
  ``custom_nodes="pack"``) and makes sure this pack is loaded: from where it sits in a
  ``custom_nodes`` folder, else through a symlink ``comfyui-mace`` in a temporary
  ``custom_nodes`` folder (else from its own folder), with ComfyUI's own loader;
* installs a progress hook like ``main.py``'s that forwards to the current console server
  (:func:`set_progress_server`).

ComfyUI keeps global state, so this is once per process; a second call returns the same
:class:`ComfyEnv`.  If ComfyUI was already imported and initialised in this process (e.g. by
the test harness) it is reused as it is.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "comfyui-mace"
"""Folder name the pack gets when it is linked into a temporary ``custom_nodes`` folder."""

HOW_TO_POINT = ("point at a ComfyUI checkout (the folder that holds main.py, nodes.py and comfy/) "
                "with --comfyui PATH or the COMFYUI_PATH environment variable, or put one at "
                "~/ComfyUI")

# Top-level module names that must resolve inside the ComfyUI checkout.
_COMFY_TOPLEVEL = ("nodes", "utils", "server", "execution", "folder_paths", "comfy", "comfy_api",
                   "comfy_execution", "comfy_extras", "app", "node_helpers", "latent_preview",
                   "protocol", "comfyui_version")

log = logging.getLogger("comfyui_mace.headless")


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI checkout (or it could not be imported); the message says what to do."""


@dataclass
class ComfyEnv:
    comfy_root: Path
    pack_dir: Path
    pack_module: Any
    pack_module_name: str
    pack_path: str
    """The path ComfyUI loaded the pack from (a ``custom_nodes`` entry or a temporary link)."""
    pack_node_ids: list[str] = field(default_factory=list)
    device: str = "?"
    reused: bool = False
    version: str = "?"
    nodes_dir: str | None = None
    """The copy of the pack whose node classes ComfyUI registered (``NODE_CLASS_MAPPINGS``).
    Differs from :attr:`pack_dir` when another copy in ``custom_nodes`` registered them first."""

    @property
    def other_copy_in_use(self) -> bool:
        return self.nodes_dir is not None and \
            os.path.realpath(self.nodes_dir) != os.path.realpath(str(self.pack_dir))

    @property
    def nodes(self):
        return sys.modules["nodes"]

    @property
    def execution(self):
        import execution

        return execution

    @property
    def folder_paths(self):
        import folder_paths

        return folder_paths

    @property
    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    def node_classes(self) -> dict[str, type]:
        return dict(self.nodes.NODE_CLASS_MAPPINGS)


_ENV: ComfyEnv | None = None
_PROGRESS: dict[str, Any] = {"server": None}
_TVSHIM: dict[str, Any] = {"lib": None}


# --------------------------------------------------------------------------------------------
# Finding ComfyUI
# --------------------------------------------------------------------------------------------

def is_comfyui(path: os.PathLike | str) -> bool:
    p = Path(path)
    return (p / "comfy").is_dir() and (p / "nodes.py").is_file()


def find_comfyui(explicit: os.PathLike | str | None = None) -> Path:
    """The checkout to use; raises :class:`ComfyUINotFound` (with how to fix it) otherwise.

    An explicit path or ``$COMFYUI_PATH`` that is set but is not a checkout is an error (never
    silently replaced by another checkout)."""
    if explicit:
        cand = Path(explicit).expanduser().resolve()
        if not is_comfyui(cand):
            raise ComfyUINotFound(f"ComfyUI not found: --comfyui {explicit} is not a ComfyUI "
                                  f"checkout (no comfy/ and nodes.py there); {HOW_TO_POINT}")
        return cand
    env = os.environ.get("COMFYUI_PATH")
    if env:
        cand = Path(env).expanduser().resolve()
        if not is_comfyui(cand):
            raise ComfyUINotFound(f"ComfyUI not found: COMFYUI_PATH={env} is not a ComfyUI "
                                  f"checkout (no comfy/ and nodes.py there); {HOW_TO_POINT}")
        return cand
    # The pack usually lives in <ComfyUI>/custom_nodes/<pack> (possibly through a symlink).
    for here in (Path(__file__).parents[1], PACK_DIR):
        if here.parent.name == "custom_nodes" and is_comfyui(here.parent.parent):
            return here.parent.parent.resolve()
    home = Path.home() / "ComfyUI"
    if is_comfyui(home):
        return home.resolve()
    raise ComfyUINotFound(f"ComfyUI not found (no --comfyui, no COMFYUI_PATH, the pack is not "
                          f"inside a ComfyUI custom_nodes folder, no ~/ComfyUI): {HOW_TO_POINT}")


def check_no_shadowing(comfy_root: Path) -> None:
    """Refuse to start if a top-level ComfyUI module name is already bound to something else."""
    bad = []
    root = str(comfy_root)
    for name in _COMFY_TOPLEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        places = [getattr(mod, "__file__", None) or ""] + list(getattr(mod, "__path__", []) or [])
        places = [os.path.realpath(p) for p in places if p]
        if places and not any(p == root or p.startswith(root + os.sep) for p in places):
            bad.append(f"{name} -> {places[0]}")
    if bad:
        raise RuntimeError(
            "cannot import ComfyUI: these top-level module names are already bound to other "
            "modules: " + "; ".join(bad) + " (is the pack folder itself on sys.path before the "
            "ComfyUI checkout, or was the pack's own nodes/ imported as top-level 'nodes'? Import "
            "the pack's modules through the package, never as top-level 'nodes'/'utils')")


# --------------------------------------------------------------------------------------------
# torch / torchvision
# --------------------------------------------------------------------------------------------

def _torchvision_cuda_build() -> bool:
    """Whether the installed torchvision is a CUDA build (read from version.py, not imported)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for loc in spec.submodule_search_locations:
        try:
            text = Path(loc, "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        m = re.search(r"^cuda\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if m:
            return m.group(1) not in ("", "None")
        return bool(re.search(r"^__version__\s*=\s*['\"][^'\"]*\+cu\d+", text, re.M))
    return False


def apply_torchvision_shim() -> bool:
    """PyPI's CUDA torchvision next to a CPU-only torch fails to import (``operator
    torchvision::nms does not exist``): declare the two op schemas its meta registrations need
    before it is imported.  Only then; returns whether anything was declared."""
    if "torchvision" in sys.modules or not _torchvision_cuda_build():
        return False
    import torch

    if torch.version.cuda is not None:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    defined = False
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::" + schema.split("(", 1)[0], "")
            continue  # already declared (e.g. by the venv's lazy copy of this shim)
        except (RuntimeError, AttributeError):
            pass
        try:
            lib.define(schema)
            defined = True
        except RuntimeError:
            pass
    _TVSHIM["lib"] = lib  # keep it alive: dropping the Library deregisters the schemas
    return defined


def torch_has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and hasattr(xpu, "is_available") and xpu.is_available())


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def working_directory(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(message)s", stream=sys.stderr)
    elif verbose:
        root.setLevel(logging.INFO)


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _quiet_start(verbose: bool):
    """Without ``verbose``: hold back ComfyUI's start-up log (built-in node modules that miss an
    optional dependency print a traceback each) and afterwards print only what matters here:
    custom nodes that failed to import, a one-line note on built-in ones, everything when the
    start failed."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    buf = _Buffer()
    saved = root.handlers[:]
    root.handlers = [buf]
    ok = False
    try:
        yield
        ok = True
    finally:
        root.handlers = saved
        _replay(buf.records, ok)


def _replay(records: list[logging.LogRecord], ok: bool) -> None:
    if not ok:
        for r in records:
            if r.levelno >= logging.WARNING:
                log.warning("%s", r.getMessage())
        return
    builtin_failed = []
    for r in records:
        msg = r.getMessage()
        m = re.match(r"Cannot import (.+) module for custom nodes: (.*)", msg, re.S)
        if m:
            path = m.group(1)
            if os.sep + "comfy_extras" + os.sep in path or os.sep + "comfy_api_nodes" + os.sep in path:
                builtin_failed.append(os.path.basename(path))
            else:
                log.warning("custom node %s failed to import: %s", path, m.group(2))
        elif r.levelno >= logging.ERROR:
            log.error("%s", msg)
    if builtin_failed:
        log.warning("note: %d built-in ComfyUI node module(s) did not import (%s); -v shows why",
                    len(builtin_failed), ", ".join(builtin_failed))


def parse_model_dirs(items: Iterable[str]) -> dict[str, list[str]]:
    """``["checkpoints=/a", "loras=/b"]`` -> ``{"checkpoints": ["/a"], "loras": ["/b"]}``."""
    out: dict[str, list[str]] = {}
    for item in items or ():
        kind, sep, path = str(item).partition("=")
        if not sep or not kind.strip() or not path.strip():
            raise ValueError(f"--extra-model-dir {item!r}: expected KIND=PATH, e.g. "
                             f"checkpoints=/data/models")
        out.setdefault(kind.strip(), []).append(os.path.abspath(os.path.expanduser(path.strip())))
    return out


def _add_model_dirs(folder_paths, dirs: Mapping[str, Iterable[str]]) -> None:
    known = sorted(folder_paths.folder_names_and_paths)
    for kind, paths in (dirs or {}).items():
        if kind not in folder_paths.folder_names_and_paths or kind == "custom_nodes":
            raise ValueError(f"--extra-model-dir: unknown model folder kind {kind!r}; known: "
                             + ", ".join(k for k in known if k != "custom_nodes"))
        for p in paths:
            if not os.path.isdir(p):
                raise ValueError(f"--extra-model-dir {kind}={p}: not a folder")
            folder_paths.add_model_folder_path(kind, str(p))


def _pack_entry_in(folders: Iterable[str]) -> str | None:
    """The entry of a ``custom_nodes`` folder that is this pack (a copy of the path, not
    resolved: ComfyUI names the module after it)."""
    want = os.path.realpath(PACK_DIR)
    for d in folders:
        try:
            names = sorted(os.listdir(os.path.realpath(d)))
        except OSError:
            continue
        for n in names:
            p = os.path.join(d, n)
            if not n.endswith(".disabled") and os.path.isdir(p) and os.path.realpath(p) == want:
                return p
    return None


def _temp_pack_path() -> str:
    """``<tmp>/custom_nodes/comfyui-mace`` -> the pack (removed at exit), or the pack folder
    itself where symlinks are not allowed."""
    tmp = tempfile.mkdtemp(prefix="mace-custom-nodes-")
    link = os.path.join(tmp, PACK_LINK_NAME)
    try:
        os.symlink(str(PACK_DIR), link, target_is_directory=True)
    except OSError:
        os.rmdir(tmp)
        return str(PACK_DIR)

    def cleanup():
        with contextlib.suppress(OSError):
            os.unlink(link)
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    return link


def _find_pack_module(preferred: str | None = None) -> tuple[str, Any] | None:
    init = os.path.realpath(PACK_DIR / "__init__.py")
    if preferred:
        mod = sys.modules.get(preferred.replace(".", "_x_"))
        if mod is not None and hasattr(mod, "comfy_entrypoint"):
            return preferred.replace(".", "_x_"), mod
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and hasattr(mod, "comfy_entrypoint") and os.path.realpath(f) == init:
            return name, mod
    return None


async def _init_nodes(nodes, folder_paths, *, all_custom_nodes: bool, builtin: bool) -> str:
    """Run ComfyUI's node initialisation and load the pack; returns the path it loaded from."""
    if builtin:
        # Like main.py: custom nodes cannot permanently monkey-patch core functions.
        hook_breaker = None
        with contextlib.suppress(ImportError):
            import hook_breaker_ac10a0 as hook_breaker
        if hook_breaker is not None:
            hook_breaker.save_functions()
        try:
            await nodes.init_extra_nodes(init_custom_nodes=all_custom_nodes, init_api_nodes=False)
        finally:
            if hook_breaker is not None:
                hook_breaker.restore_functions()
    entry = _pack_entry_in(folder_paths.get_folder_paths("custom_nodes"))
    if entry is not None and _find_pack_module(entry) is not None:
        return entry  # loaded by init_external_custom_nodes
    found = _find_pack_module()
    if found is not None:
        return getattr(found[1], "__file__", str(PACK_DIR))
    path = entry or _temp_pack_path()
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = await nodes.load_custom_node(path, before, module_parent="custom_nodes")
    if not ok:
        raise RuntimeError(f"comfyui-mace failed to load into ComfyUI from {path} (see the "
                           f"ComfyUI log lines above)")
    return path


def set_progress_server(server) -> None:
    """Where progress-bar updates go (an object with ``send_sync``; None: nowhere)."""
    _PROGRESS["server"] = server


def _install_progress_hook() -> None:
    """Like ``main.py:hijack_progress``: every ProgressBar update is an interrupt point and is
    sent as a ``progress`` message to the current server (previews are not forwarded)."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if ctx is not None:
            prompt_id = prompt_id if prompt_id is not None else ctx.prompt_id
            node_id = node_id if node_id is not None else ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        srv = _PROGRESS["server"]
        if srv is not None:
            prompt_id = prompt_id if prompt_id is not None else getattr(srv, "last_prompt_id", None)
            node_id = node_id if node_id is not None else getattr(srv, "last_node_id", None)
        with contextlib.suppress(Exception):  # no prompt in progress: a node called directly
            get_progress_state().update_progress(node_id, value, total, preview_image)
        if srv is not None:
            srv.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                       "node": node_id}, getattr(srv, "client_id", None))

    comfy.utils.set_progress_bar_global_hook(hook)


def _comfy_already_imported() -> Path | None:
    mod = sys.modules.get("nodes")
    if mod is None or not isinstance(getattr(mod, "NODE_CLASS_MAPPINGS", None), dict) \
            or "folder_paths" not in sys.modules:
        return None
    return Path(mod.__file__).resolve().parent


def bootstrap(comfyui: os.PathLike | str | None = None, *, base_directory=None,
              output_directory=None, extra_model_dirs: Mapping[str, Iterable[str]] | None = None,
              extra_model_paths_config: Iterable[str] = (), custom_nodes: str = "all",
              cpu: bool | None = None, verbose: bool = False) -> ComfyEnv:
    """Import and initialise ComfyUI with this pack loaded; once per process.

    ``custom_nodes``: ``"all"`` loads the install's custom nodes as the server would (and this
    pack); ``"pack"`` loads only this pack.  ``cpu``: None = only when torch has no accelerator.
    ``extra_model_dirs``: ``{kind: [folder, ...]}`` added to ComfyUI's model folders.
    Raises :class:`ComfyUINotFound` when no checkout is found or it does not import.
    """
    global _ENV
    if custom_nodes not in ("all", "pack"):
        raise ValueError(f"custom_nodes must be 'all' or 'pack', not {custom_nodes!r}")
    if _ENV is not None:
        _apply_late_options(_ENV, base_directory, output_directory, extra_model_dirs,
                            extra_model_paths_config)
        return _ENV
    existing = _comfy_already_imported()
    if existing is not None:
        _ENV = _reuse(existing)
        _apply_late_options(_ENV, base_directory, output_directory, extra_model_dirs,
                            extra_model_paths_config)
        return _ENV

    comfy_root = find_comfyui(comfyui)
    check_no_shadowing(comfy_root)
    base = os.path.abspath(os.path.expanduser(str(base_directory))) if base_directory else None
    out_dir = os.path.abspath(os.path.expanduser(str(output_directory))) if output_directory else None
    configs = [os.path.abspath(os.path.expanduser(str(c))) for c in extra_model_paths_config or ()]
    _setup_logging(verbose)

    apply_torchvision_shim()
    if cpu is None:
        cpu = not torch_has_accelerator()

    if str(comfy_root) in sys.path:
        sys.path.remove(str(comfy_root))
    sys.path.insert(0, str(comfy_root))
    try:
        with _quiet_start(verbose), working_directory(comfy_root):
            from comfy.cli_args import args

            if cpu:
                args.cpu = True
            if base:
                os.makedirs(base, exist_ok=True)
                args.base_directory = base
            if out_dir:
                args.output_directory = out_dir
            args.disable_auto_launch = True

            import utils.extra_config
            import folder_paths

            if base and os.path.realpath(folder_paths.base_path) != os.path.realpath(base):
                raise RuntimeError(f"folder_paths was imported before the bootstrap (base_path="
                                   f"{folder_paths.base_path}); cannot use --base-directory {base}")
            # main.py: apply_custom_paths()
            yaml_path = comfy_root / "extra_model_paths.yaml"
            if yaml_path.is_file():
                utils.extra_config.load_extra_path_config(str(yaml_path))
            for c in configs:
                utils.extra_config.load_extra_path_config(c)
            if out_dir:
                folder_paths.set_output_directory(out_dir)
            out = folder_paths.get_output_directory()
            for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
                folder_paths.add_model_folder_path(name, os.path.join(out, name))
            _add_model_dirs(folder_paths, extra_model_dirs or {})
            # ComfyUI lists every custom_nodes folder; one that does not exist would crash it.
            cn_paths, cn_exts = folder_paths.folder_names_and_paths["custom_nodes"]
            folder_paths.folder_names_and_paths["custom_nodes"] = (
                [p for p in cn_paths if os.path.isdir(p)], cn_exts)

            import server  # noqa: F401  (before `nodes`, as main.py does)
            import execution  # noqa: F401
            import nodes

            pack_path = asyncio.run(_init_nodes(nodes, folder_paths,
                                                all_custom_nodes=custom_nodes == "all",
                                                builtin=True))
            _install_progress_hook()
    except ComfyUINotFound:
        raise
    except ImportError as exc:
        raise ComfyUINotFound(f"ComfyUI at {comfy_root} could not be imported ({exc!r}); is this "
                              f"Python the one ComfyUI's requirements are installed in? Or "
                              f"{HOW_TO_POINT}") from exc
    _ENV = _make_env(comfy_root, pack_path, reused=False)
    return _ENV


def _reuse(comfy_root: Path) -> ComfyEnv:
    import folder_paths
    import nodes

    builtin = not any(str(getattr(c, "RELATIVE_PYTHON_MODULE", "")).startswith("comfy_extras.")
                      for c in nodes.NODE_CLASS_MAPPINGS.values())
    found = _find_pack_module()
    if found is not None and not builtin:
        pack_path = _pack_entry_in(folder_paths.get_folder_paths("custom_nodes")) or found[0]
    else:
        pack_path = asyncio.run(_init_nodes(nodes, folder_paths, all_custom_nodes=False,
                                            builtin=builtin))
    return _make_env(comfy_root, pack_path, reused=True)


PROBE_NODE = "MaceRefineCrossAttention"


def registered_pack_dir() -> str | None:
    """The folder of the pack copy whose MACE nodes ComfyUI registered (None: none are)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(PROBE_NODE)
    mod = sys.modules.get(getattr(cls, "__module__", "") or "")
    f = getattr(mod, "__file__", None)
    if not f:
        return None
    return str(Path(f).resolve().parents[1])  # <pack>/nodes/cfr_node.py -> <pack>


def _make_env(comfy_root: Path, pack_path: str, reused: bool) -> ComfyEnv:
    import nodes

    found = _find_pack_module(pack_path)
    if found is None:
        raise RuntimeError(f"comfyui-mace ({PACK_DIR}) is not loaded in ComfyUI")
    name, mod = found
    ids = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                 if str(getattr(v, "__module__", "")).startswith(name + "."))
    if not ids:
        log.warning("comfyui-mace loaded from %s but registered no nodes (another copy of the "
                    "pack may have registered them first)", pack_path)
    device = "?"
    with contextlib.suppress(Exception):
        import comfy.model_management

        device = str(comfy.model_management.get_torch_device())
    version = "?"
    with contextlib.suppress(Exception):
        import comfyui_version

        version = comfyui_version.__version__
    return ComfyEnv(comfy_root=comfy_root, pack_dir=PACK_DIR, pack_module=mod,
                    pack_module_name=name, pack_path=str(pack_path), pack_node_ids=ids,
                    device=device, reused=reused, version=version, nodes_dir=registered_pack_dir())


def _apply_late_options(env: ComfyEnv, base_directory, output_directory, extra_model_dirs,
                        extra_model_paths_config) -> None:
    """Options given to a second bootstrap() call (or when ComfyUI was already initialised)."""
    fp = env.folder_paths
    if base_directory and os.path.realpath(fp.base_path) != os.path.realpath(str(base_directory)):
        raise RuntimeError(f"ComfyUI is already initialised in this process with base directory "
                           f"{fp.base_path}; cannot switch to {base_directory}")
    if output_directory:
        fp.set_output_directory(os.path.abspath(os.path.expanduser(str(output_directory))))
    if extra_model_paths_config:
        import utils.extra_config

        for c in extra_model_paths_config:
            utils.extra_config.load_extra_path_config(os.path.abspath(os.path.expanduser(str(c))))
    _add_model_dirs(fp, extra_model_dirs or {})


def get_env() -> ComfyEnv | None:
    return _ENV
