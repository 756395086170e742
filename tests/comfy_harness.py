"""In-process real-ComfyUI harness for the integration tests (not a test module).

What it does (see :func:`init_comfyui`):

* finds a ComfyUI checkout (``$COMFYUI_PATH``, else ``~/ComfyUI``; it must contain ``comfy/``
  and ``nodes.py``), or skips with one loud line (:func:`require_comfyui`);
* makes a temp ``--base-directory`` (models/, output/, temp/, input/, user/, custom_nodes/ --
  nothing is ever written into the checkout), symlinks the repository root into
  ``<base>/custom_nodes/comfyui-mace`` and starts ComfyUI through the pack's own
  ``headless.bootstrap.bootstrap()`` (torchvision shim, CPU, import order, ComfyUI's loader
  importing the pack from that ``custom_nodes`` entry, progress hook): the tests start ComfyUI
  exactly as ``python -m comfyui_mace run`` does;
* executes workflows with ``execution.PromptExecutor`` and a stub server that records every
  message (:func:`run_workflow`), without the HTTP server.

ComfyUI keeps global state, so the harness is a per-process singleton: the first
:func:`init_comfyui` call decides the base directory.

Also here: :func:`ui_workflow_to_api` / :func:`check_ui_workflow` (run and lint the UI-format
``workflows/*.json``; re-exported from the pack's ``headless/ui_to_api.py``, which
:func:`load_pack_package` makes importable as ``comfyui_mace.headless.ui_to_api``) and
:func:`make_tiny_sd15_checkpoint` (a 25.8 M-parameter UNet with the SD1.5 key layout, a reduced
CLIP-L and a TAESD VAE, built at test time).
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "comfyui-mace"
"""Name of the symlink under ``<base>/custom_nodes``; it decides the pack's web path
(``/extensions/comfyui-mace/``) and ``RELATIVE_PYTHON_MODULE`` (``custom_nodes.comfyui-mace``)."""

PACK_PACKAGE = "comfyui_mace"
"""Name under which the repository root is importable as a package in the test process (the
folder name need not be a valid module name)."""


def load_pack_package(name: str = PACK_PACKAGE):
    """The repository root as the package ``name`` (``importlib``, from its path).

    Its ``__init__.py`` is not executed: it would import the ComfyUI nodes (and ComfyUI's
    ``folder_paths``) as soon as ComfyUI is importable.  Submodules (``headless``,
    ``mace_ops``) import normally.  This is a different module tree from the one ComfyUI loads
    as the custom-node pack (see :attr:`ComfyHarness.pack_module`)."""
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
    return mod


load_pack_package()
_bootstrap = importlib.import_module(f"{PACK_PACKAGE}.headless.bootstrap")
_executor_compat = importlib.import_module(f"{PACK_PACKAGE}.headless.executor_compat")
_is_comfyui = _bootstrap.is_comfyui


TEST_PRIOR_CAPTIONS = 64

SKIP_MESSAGE = (
    "ComfyUI not found: set COMFYUI_PATH or extract ComfyUI to ~/ComfyUI; integration tests SKIPPED"
)

# --------------------------------------------------------------------------------------------
# Finding ComfyUI
# --------------------------------------------------------------------------------------------

def find_comfyui() -> Path | None:
    """``$COMFYUI_PATH`` if set, else ``~/ComfyUI``; ``None`` unless it looks like a checkout."""
    env = os.environ.get("COMFYUI_PATH")
    cand = Path(env).expanduser() if env else Path.home() / "ComfyUI"
    try:
        cand = cand.resolve()
    except OSError:
        return None
    return cand if _is_comfyui(cand) else None


def require_comfyui() -> Path:
    """The checkout, or ``pytest.skip`` with one loud line."""
    path = find_comfyui()
    if path is None:
        import pytest

        # Also print it: pytest's -q summary may hide skip reasons in some setups.
        sys.stderr.write("\n" + SKIP_MESSAGE + "\n")
        pytest.skip(SKIP_MESSAGE)
    return path


# --------------------------------------------------------------------------------------------
# The stub server and progress hook
# --------------------------------------------------------------------------------------------

class StubServer:
    """The attributes and methods of ``server.PromptServer`` that the executor, the progress
    handlers and common nodes touch.  Every event is recorded in :attr:`messages`."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    async def send(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))

    def queue_updated(self):
        pass


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------

@dataclass
class ComfyHarness:
    comfy_root: Path
    base_dir: Path
    custom_nodes_dir: Path
    pack_link: Path | None
    pack_loaded: bool = False
    pack_error: str | None = None
    pack_module_name: str | None = None
    pack_node_ids: list[str] = field(default_factory=list)
    server: StubServer | None = None
    last_executor: Any = None
    init_seconds: float = 0.0

    # Convenience accessors for the ComfyUI modules (imported by then).
    @property
    def nodes(self):
        import nodes

        return nodes

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

    @property
    def temp_dir(self) -> Path:
        return Path(self.folder_paths.get_temp_directory())

    @property
    def input_dir(self) -> Path:
        return Path(self.folder_paths.get_input_directory())

    @property
    def checkpoints_dir(self) -> Path:
        return self.base_dir / "models" / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        return self.base_dir / "models" / "loras"

    @property
    def pack_module(self):
        return sys.modules.get(self.pack_module_name) if self.pack_module_name else None

    def node_classes(self) -> dict[str, type]:
        return dict(self.nodes.NODE_CLASS_MAPPINGS)

    def require_pack(self) -> None:
        """Fail (not skip) if the pack under test did not load."""
        if not self.pack_loaded:
            raise AssertionError(f"comfyui-mace did not load into ComfyUI: {self.pack_error}")

    def add_model_dir(self, folder_name: str, path: os.PathLike | str) -> None:
        """Register an extra model folder (e.g. a tmp dir with a generated checkpoint)."""
        self.folder_paths.add_model_folder_path(folder_name, str(path))

    def run_workflow(self, api_prompt: Mapping, **kw):
        return run_workflow(api_prompt, harness=self, **kw)

    def node_output(self, node_id: str | int, slot: int = 0, executor=None):
        """The cached Python output (e.g. an IMAGE tensor) of a node after :meth:`run_workflow`."""
        ex = executor or self.last_executor
        if ex is None:
            raise RuntimeError("no workflow has been run yet")
        out = _executor_compat.cached_output(ex.caches.outputs, str(node_id))
        if out is None:
            raise KeyError(f"node {node_id} has no cached output (not executed, or cache_type=none)")
        # Newer ComfyUI versions wrap outputs in a CacheEntry-like object.
        out = getattr(out, "outputs", out)
        value = out[slot]
        return value[0] if isinstance(value, list) and len(value) == 1 else value


_HARNESS: ComfyHarness | None = None


def init_comfyui(base_dir: os.PathLike | str | None = None, *,
                 use_checkout_models: bool = False) -> ComfyHarness:
    """Start ComfyUI in this process (once) through the pack's own
    :func:`headless.bootstrap.bootstrap` -- the same start-up as ``python -m comfyui_mace run``
    -- and return the harness.

    ``base_dir``: ComfyUI's ``--base-directory`` (default: a new temp dir): models/, output/,
    temp/, input/, user/ and custom_nodes/ all live there, and the repository is linked in as
    ``<base>/custom_nodes/comfyui-mace``, so ComfyUI's loader imports the pack from a
    ``custom_nodes`` entry as in a user's install; nothing from the checkout's custom_nodes/
    loads (``custom_nodes="pack"``).  ``use_checkout_models``: also register the checkout's
    ``models/{checkpoints,loras,vae,embeddings}`` (read-only use, for demos with real weights).
    A pack that fails to load is recorded (:meth:`ComfyHarness.require_pack` fails the tests
    that need it) rather than raised.
    """
    global _HARNESS
    if _HARNESS is not None:
        return _HARNESS

    import time

    t0 = time.perf_counter()
    comfy_root = find_comfyui()
    if comfy_root is None:
        raise RuntimeError(SKIP_MESSAGE)

    base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="mace-comfy-"))
    base = base.resolve()
    for sub in ("models/checkpoints", "models/loras", "models/vae", "models/embeddings",
                "output", "temp", "input", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    custom_nodes = base / "custom_nodes"
    pack_link = custom_nodes / PACK_DIR_NAME
    if pack_link.is_symlink() or pack_link.exists():
        if pack_link.resolve() != REPO_ROOT:
            raise RuntimeError(f"{pack_link} exists and is not a link to {REPO_ROOT}")
    else:
        pack_link.symlink_to(REPO_ROOT, target_is_directory=True)

    extra = {}
    if use_checkout_models:
        for kind in ("checkpoints", "loras", "vae", "embeddings"):
            if (comfy_root / "models" / kind).is_dir():
                extra[kind] = [str(comfy_root / "models" / kind)]

    h = ComfyHarness(comfy_root=comfy_root, base_dir=base, custom_nodes_dir=custom_nodes,
                     pack_link=pack_link)
    if not (REPO_ROOT / "__init__.py").is_file():
        h.pack_error = f"{REPO_ROOT / '__init__.py'} does not exist"
    try:
        env = _bootstrap.bootstrap(comfy_root, base_directory=base, extra_model_dirs=extra,
                                   custom_nodes="pack", cpu=True)
    except _bootstrap.ComfyUINotFound:
        raise
    except RuntimeError as exc:  # the pack did not load
        import nodes  # noqa: F401  (ComfyUI itself is initialised by then)

        h.pack_error = h.pack_error or str(exc)
    else:
        h.pack_module_name = env.pack_module_name
        h.pack_node_ids = list(env.pack_node_ids)
        if h.pack_error is None and not h.pack_node_ids:
            h.pack_error = "the pack imported but registered no nodes"
        h.pack_loaded = h.pack_error is None
        prior = sys.modules.get(f"{env.pack_module_name}.nodes.prior_input")
        if h.pack_loaded and prior is not None:  # in-process tests: a 64-caption general prior (nodes: 1,000)
            prior.PRIOR_CAPTIONS = TEST_PRIOR_CAPTIONS
        install_tiny_te_depth_hook()
    h.init_seconds = time.perf_counter() - t0
    _HARNESS = h
    return h


def get_harness() -> ComfyHarness:
    if _HARNESS is None:
        raise RuntimeError("init_comfyui() has not been called")
    return _HARNESS


# --------------------------------------------------------------------------------------------
# Running workflows
# --------------------------------------------------------------------------------------------

def _format_node_errors(err, node_errors) -> str:
    lines = [f"prompt validation failed: {json.dumps(err, default=str)}"]
    for nid, ne in (node_errors or {}).items():
        cls = ne.get("class_type")
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({cls}): {e.get('type')}: {e.get('message')}: "
                         f"{e.get('details')}")
    return "\n".join(lines)


def run_workflow(api_prompt: Mapping, *, harness: ComfyHarness | None = None,
                 cache_type: str = "classic", executor=None, extra_data: dict | None = None,
                 check: bool = True, prompt_id: str | None = None):
    """Validate and execute an API-format prompt in-process.

    Returns ``(history, messages)``: ``history`` is the executor's ``history_result``
    (``{"outputs": {node_id: ui_dict}, "meta": ...}``) plus ``"status"`` (``"success"`` or
    ``"error"``) and ``"prompt_id"``; ``messages`` is the ordered list of ``(event, data)`` a
    websocket client would have seen (execution_start, executing, progress, executed,
    execution_success / execution_error ...).

    Validation failures raise ``AssertionError`` with the node errors.  With ``check=True``
    (default) an execution error also raises, with the exception text and traceback.
    ``cache_type``: "classic" (default), "lru" or "none" (dependency-aware, no intermediate
    cache).  Pass ``executor=`` to reuse one across calls (its cache then persists); the
    executor used is kept in ``harness.last_executor`` (see :meth:`ComfyHarness.node_output`).
    """
    h = harness or get_harness()
    import execution

    prompt = {str(k): copy.deepcopy(dict(v)) for k, v in api_prompt.items()}
    pid = prompt_id or str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    ok, err, outputs, node_errors = valid[0], valid[1], valid[2], valid[3]
    if not ok:
        raise AssertionError(_format_node_errors(err, node_errors))

    server = StubServer()
    server.last_prompt_id = pid
    if executor is None:
        executor = _executor_compat.make_executor(server, cache_type)
    else:
        executor.server = server
    h.server = server
    h.last_executor = executor
    data = {"client_id": "mace-harness"}
    data.update(extra_data or {})
    _bootstrap.set_progress_server(server)  # bootstrap's progress hook reports to it
    try:
        with _executor_compat.unthrottled_progress():  # tests count progress events
            executor.execute(prompt, pid, data, outputs)
    finally:
        h.server = None
        _bootstrap.set_progress_server(None)

    events = [e for e, _ in server.messages]
    success = executor.success and "execution_success" in events
    history = dict(getattr(executor, "history_result", {}) or {})
    history["status"] = "success" if success else "error"
    history["prompt_id"] = pid
    if check and not success:
        details = []
        for ev, d in server.messages:
            if ev in ("execution_error", "execution_interrupted"):
                details.append(
                    f"{ev} in node {d.get('node_id')} ({d.get('node_type')}): "
                    f"{d.get('exception_type', '')}: {d.get('exception_message', '')}\n"
                    + "".join(d.get("traceback", []) or []))
        raise AssertionError("workflow execution failed:\n" + ("\n".join(details) or
                             f"no execution_success; events={events}"))
    return history, server.messages


# --------------------------------------------------------------------------------------------
# UI-format workflow -> API format: one copy, in the pack (headless/ui_to_api.py)
# --------------------------------------------------------------------------------------------

_ui = importlib.import_module(f"{PACK_PACKAGE}.headless.ui_to_api")
WIDGET_TYPES = _ui.WIDGET_TYPES
FRONTEND_ONLY = _ui.FRONTEND_ONLY
MODE_MUTED, MODE_BYPASS = _ui.MODE_MUTED, _ui.MODE_BYPASS
ui_workflow_to_api = _ui.ui_workflow_to_api
check_ui_workflow = _ui.check_ui_workflow
check_api_prompt = _ui.check_api_prompt
load_workflow = _ui.load_workflow


# --------------------------------------------------------------------------------------------
# Tiny SD1.5-layout checkpoint
# --------------------------------------------------------------------------------------------

TINY_TE_KEY = "mace_tiny_te_config"
"""Safetensors metadata key of the tiny checkpoints: JSON ``{encoder name: config overrides}``
(``clip_l``, ``clip_h``, ``clip_g`` -> e.g. ``{"num_hidden_layers": 3}``), read by
:func:`tiny_te_model_options`."""

TINY_TE_FFN = 64
"""MLP width of the tiny SD2/SDXL text encoders (real: 4x the width).  Their width (1024, 768 +
1280) is the real one -- it is what cross-attention reads -- and the depth is 3, the least
ComfyUI accepts for the penultimate layer these families read; a narrow MLP makes encoding,
the bulk of CFR and fusion, 3x cheaper on CPU."""

TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)


def _init_tensor(key: str, shape, gen, torch):
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "vae_scale":
        return torch.ones(shape)
    if leaf == "vae_shift":
        return torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "weight" and len(shape) == 1:   # GroupNorm / LayerNorm
        return torch.ones(shape)
    return torch.randn(tuple(shape), generator=gen) * 0.02


def make_tiny_sd15_checkpoint(path: os.PathLike | str, clip_layers: int = 1, seed: int = 0) -> Path:
    """Write a deterministic tiny SD1.5-layout checkpoint (fp16 safetensors) to ``path``.

    UNet: ComfyUI's ``UNetModel`` with one 320-channel level (25.8 M params; detected as SD15:
    4 cross-attention layers = 8 attn2 to_k/to_v tensors).  CLIP-L: ``clip_layers`` encoder
    layers, hidden 768, vocab 49408.  VAE: TAESD under ``first_stage_model.taesd_*``.  Weights
    N(0, 0.02), norm weights 1, biases 0.  ComfyUI classes are instantiated on the ``meta``
    device only to get the key layout.  Needs :func:`init_comfyui` first.
    """
    get_harness()
    import torch
    from safetensors.torch import save_file

    import comfy.clip_model
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    shapes: dict[str, tuple] = {}
    with torch.device("meta"):
        unet = UNetModel(dtype=torch.float32, device="meta", operations=ops, **TINY_UNET_CONFIG)
        for k, v in unet.state_dict().items():
            shapes["model.diffusion_model." + k] = tuple(v.shape)
        del unet

        cfg_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
        cfg = json.loads(cfg_path.read_text())
        cfg["num_hidden_layers"] = int(clip_layers)
        clip = comfy.clip_model.CLIPTextModel(cfg, dtype=torch.float32, device="meta",
                                              operations=ops)
        for k, v in clip.state_dict().items():
            if k.startswith("text_model."):
                shapes["cond_stage_model.transformer." + k] = tuple(v.shape)
        del clip

        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        for k, v in taesd.state_dict().items():
            shapes["first_stage_model." + k] = tuple(v.shape)
        del taesd

    gen = torch.Generator().manual_seed(int(seed))
    sd = {}
    for k in sorted(shapes):
        sd[k] = _init_tensor(k, shapes[k], gen, torch).to(torch.float16).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "mace_tiny_sd15_clip_layers": str(clip_layers),
                                       "mace_tiny_family": "sd15",
                                       TINY_TE_KEY: json.dumps({"clip_l": {"num_hidden_layers": int(clip_layers)}})})
    return path


# --------------------------------------------------------------------------------------------
# Tiny SD2.x- and SDXL-layout checkpoints
# --------------------------------------------------------------------------------------------

TINY_SD2_UNET_CONFIG = dict(
    # Six 320-channel levels of one res block each: the fewest res blocks for which
    # output_blocks.11 exists, the block SD20.model_type reads to detect v-prediction.
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1] * 6,
    channel_mult=[1] * 6, transformer_depth=[1, 0, 0, 0, 0, 0],
    transformer_depth_output=[1] + [0] * 10 + [1],  # [0] <-> output_blocks.11, [11] <-> .0
    transformer_depth_middle=1, context_dim=1024, num_heads=-1, num_head_channels=64,
    use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)

TINY_SDXL_UNET_CONFIG = dict(
    # KOALA_700M's input depth [0, 2, 5] (the smallest SDXL-family key ComfyUI matches) with
    # every level at 320 channels (channel_mult is detected but not matched).
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
    channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5],
    transformer_depth_output=[0, 0, 0, 1, 0, 1], transformer_depth_middle=1, context_dim=2048,
    num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
    use_temporal_attention=False, use_temporal_resblock=False,
)

V_PRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
"""SD20.model_type: v-prediction when this bias has std > 0.09 (as SD2.x 768-v checkpoints do)."""


def _init_fp16(key: str, shape, gen, torch):
    """:func:`_init_tensor`'s values, drawn directly in fp16 (3x faster for the big encoders)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) > 1:
        return torch.empty(tuple(shape), dtype=torch.float16).normal_(0.0, 0.02, generator=gen)
    return _init_tensor(key, shape, gen, torch).to(torch.float16)


def _clip_shapes(family: str, te_config: Mapping[str, dict], torch) -> dict[str, tuple]:
    """ComfyUI-internal text-encoder key -> shape (``clip_h.transformer...``), on ``meta``."""
    options = {f"{name}_model_config": dict(cfg) for name, cfg in te_config.items()}
    if family == "sd2":
        from comfy.text_encoders.sd2_clip import SD2ClipModel as cls
    else:
        from comfy.sdxl_clip import SDXLClipModel as cls
    with torch.device("meta"):
        model = cls(device="meta", dtype=torch.float32, model_options=options)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_tiny_checkpoint(path: os.PathLike | str, family: str = "sd15", *, te_layers: int | None = None,
                         seed: int = 0, v_prediction: bool | None = None) -> Path:
    """Write a deterministic tiny checkpoint of ``family``'s layout (fp16 safetensors).

    * ``"sd15"``: :func:`make_tiny_sd15_checkpoint` (``te_layers`` CLIP-L layers, default 1).
    * ``"sd2"``: UNet :data:`TINY_SD2_UNET_CONFIG` (context 1024, linear proj_in, no adm: ComfyUI
      detects ``SD20``), OpenCLIP-H text encoder (width 1024, ``te_layers`` layers, default 3: ComfyUI
      asserts more layers than the penultimate index it reads; MLP width :data:`TINY_TE_FFN`) in
      the SD2 checkpoint format (``cond_stage_model.model.*``), TAESD VAE.  With
      ``v_prediction`` (default) the bias SD20 inspects gets std 0.12, so ComfyUI picks
      ``ModelType.V_PREDICTION``; otherwise EPS.
    * ``"sdxl"``: UNet :data:`TINY_SDXL_UNET_CONFIG` (context 2048, adm 2816, input transformer
      depth [0, 2, 5]: ComfyUI detects ``KOALA_700M``, a ``supported_models.SDXL`` subclass
      whose model is ``model_base.SDXL`` with SDXL's CLIP-L + CLIP-G target), CLIP-L and
      OpenCLIP-bigG (``te_layers`` layers each, default 3) in the SDXL checkpoint format
      (``conditioner.embedders.{0,1}``), TAESD-layout VAE.  ``v_prediction`` adds the ``v_pred``
      key SDXL checkpoints use for that (default off: EPS).

    The text-encoder keys are produced by the family's own ComfyUI config
    (``process_clip_state_dict_for_saving``), so loading exercises ComfyUI's real conversion.
    The encoders' config overrides (depth, :data:`TINY_TE_FFN`) are stored under :data:`TINY_TE_KEY`.  Needs :func:`init_comfyui`.
    """
    if family == "sd15":
        return make_tiny_sd15_checkpoint(path, clip_layers=te_layers or 1, seed=seed)
    if family not in ("sd2", "sdxl"):
        raise ValueError(f"family: {family!r}; one of sd15, sd2, sdxl")
    get_harness()
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    n = int(te_layers or 3)
    unet_cfg = TINY_SD2_UNET_CONFIG if family == "sd2" else TINY_SDXL_UNET_CONFIG
    te = {"num_hidden_layers": n, "intermediate_size": TINY_TE_FFN}
    layers = {"clip_h": te} if family == "sd2" else {"clip_l": te, "clip_g": te}
    shapes: dict[str, tuple] = {}
    with torch.device("meta"):
        unet = UNetModel(dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
                         **unet_cfg)
        shapes.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()})
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        shapes.update({"first_stage_model." + k: tuple(v.shape) for k, v in taesd.state_dict().items()})
        del unet, taesd
    clip_shapes = _clip_shapes(family, layers, torch)

    gen = torch.Generator().manual_seed(int(seed))
    sd = {k: _init_fp16(k, shapes[k], gen, torch) for k in sorted(shapes)}
    clip_sd = {}
    for k in sorted(clip_shapes):
        if k.endswith("logit_scale"):
            clip_sd[k] = torch.tensor(4.6055)
        elif k.endswith("position_ids"):
            clip_sd[k] = torch.arange(77).expand(1, -1).clone()
        else:
            clip_sd[k] = _init_fp16(k, clip_shapes[k], gen, torch)
    config_cls = sm.SD20 if family == "sd2" else sm.KOALA_700M
    sd.update(config_cls(dict(unet_cfg)).process_clip_state_dict_for_saving(clip_sd))
    want_v = (family == "sd2") if v_prediction is None else bool(v_prediction)
    if family == "sd2" and want_v:
        b = torch.randn(sd[V_PRED_KEY].shape, generator=gen)
        sd[V_PRED_KEY] = 0.12 * (b - b.mean()) / b.std(unbiased=False)
    if family == "sdxl" and want_v:
        sd["v_pred"] = torch.tensor([])
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "mace_tiny_family": family,
                                       TINY_TE_KEY: json.dumps(layers)})
    return path


def _tiny_metadata(path) -> dict:
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 -- not ours to judge: ComfyUI reports its own load errors
        return {}


def tiny_te_model_options(path: os.PathLike | str) -> dict:
    """``te_model_options`` giving each text encoder the depth a tiny checkpoint was built with
    (``{}`` for any other file)."""
    meta = _tiny_metadata(path)
    if TINY_TE_KEY not in meta:
        return {}
    return {f"{name}_model_config": dict(cfg) for name, cfg in json.loads(meta[TINY_TE_KEY]).items()}


def install_tiny_te_depth_hook() -> None:
    """Make ComfyUI's checkpoint loading (``CheckpointLoaderSimple`` through the executor) build
    a tiny SD2/SDXL checkpoint's text encoders at the depth stored in the file.

    The stock loader always builds full-depth encoders (OpenCLIP-bigG: 32 layers, 695 M
    parameters) and leaves layers the file lacks uninitialised.  Shipping full-depth random
    encoders would make each tiny SDXL file 1.6 GB and each CFR solve minutes of CPU, so the
    harness passes the file's depth as ``te_model_options`` (a parameter of
    ``comfy.sd.load_checkpoint_guess_config`` the stock node leaves at its default) -- only for
    files that carry :data:`TINY_TE_KEY`; everything else about loading is ComfyUI's.
    The SD1 ``tiny_ckpt`` carries all 12 CLIP-L layers and needs no hook."""
    import comfy.sd

    real = comfy.sd.load_checkpoint_guess_config
    if getattr(real, "_mace_tiny_hook", False):
        return

    def load_checkpoint_guess_config(ckpt_path, *args, **kwargs):
        if not kwargs.get("te_model_options") and TINY_TE_KEY in _tiny_metadata(ckpt_path):
            kwargs["te_model_options"] = tiny_te_model_options(ckpt_path)
        return real(ckpt_path, *args, **kwargs)

    load_checkpoint_guess_config._mace_tiny_hook = True
    comfy.sd.load_checkpoint_guess_config = load_checkpoint_guess_config


def load_tiny_checkpoint(path: os.PathLike | str, clip_layers: int | None = None):
    """``comfy.sd.load_checkpoint_guess_config`` with the text-encoder depth the file was built
    with (``clip_layers`` overrides it for an SD1 file).  Returns ``(model_patcher, clip, vae)``."""
    get_harness()
    import comfy.sd

    options = tiny_te_model_options(path)
    if clip_layers is not None:
        options = {"clip_l_model_config": {"num_hidden_layers": int(clip_layers)}}
    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, te_model_options=options)
    return out[0], out[1], out[2]


def stock_t2i_prompt(ckpt_name: str, *, positive="a photo of a cat", negative="",
                     width=64, height=64, steps=2, cfg=7.0, seed=0, sampler="euler",
                     scheduler="normal", save=False, prefix="mace_test") -> dict:
    """API prompt: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler
    -> VAEDecode -> PreviewImage (or SaveImage).  Node ids are "1".."7" (VAEDecode is "6")."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                         "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": ({"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
              if save else {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}),
    }


def checkpoint_family(name: str) -> str:
    """"sdxl", "sd2" or "sd15" from a checkpoint file name (the shipped workflows' names)."""
    low = name.lower()
    if "xl" in low:
        return "sdxl"
    if "v2-" in low or "sd2" in low or "2-1" in low or "2.1" in low:
        return "sd2"
    return "sd15"


def renumber(api_prompt: Mapping, rename: Mapping[str, str]) -> dict:
    """Copy of an API prompt with node ids renamed (``{old: new}``), links rewritten; other ids
    become "n<old>" so they cannot collide with the new ones."""
    new_id = lambda k: rename.get(k, f"n{k}")  # noqa: E731
    out = {}
    for k, node in api_prompt.items():
        node = copy.deepcopy(dict(node))
        node["inputs"] = {n: ([new_id(str(v[0])), v[1]] if isinstance(v, list) and len(v) == 2
                              and str(v[0]) in api_prompt else v) for n, v in node["inputs"].items()}
        out[new_id(str(k))] = node
    return out


def retarget_for_test(api_prompt: Mapping, ckpt_name: str, *, max_side: int = 64,
                      max_steps: int = 2) -> dict:
    """Copy of an API prompt made cheap enough for CI: every ``ckpt_name`` input points at
    ``ckpt_name`` (e.g. the tiny checkpoint), image/latent sizes are capped at ``max_side``,
    sampler and training steps at ``max_steps`` and image counts at 2.  Other inputs are untouched.

    A step count of 0 means "the default for the concept type" to the MACE training nodes
    (50-120 LoRA steps per concept): it becomes an explicit ``max_steps`` too, so a test never
    trains the full default by accident.

    A node with a ``preset`` input (CFR, Mass Erase, ACE, Erasure Check) gets ``preset: custom``,
    so the capped values (and any the test sets afterwards) are the ones that run."""
    out = copy.deepcopy(dict(api_prompt))
    for node in out.values():
        inputs = node.get("inputs", {})
        if isinstance(inputs.get("preset"), str):
            inputs["preset"] = "custom"
        if isinstance(inputs.get("ckpt_name"), str):
            inputs["ckpt_name"] = ckpt_name
        for key in ("width", "height", "image_size"):
            if isinstance(inputs.get(key), int):
                inputs[key] = min(inputs[key], max_side)
        for key in ("steps", "lora_steps", "sampling_steps"):
            if isinstance(inputs.get(key), int):
                inputs[key] = max_steps if inputs[key] == 0 else min(inputs[key], max_steps)
        for key in ("count", "images_per_concept"):
            if isinstance(inputs.get(key), int):
                inputs[key] = min(inputs[key], 2)
    return out


# --------------------------------------------------------------------------------------------
# Cancel
# --------------------------------------------------------------------------------------------

def cancel_at_first_encode(pack, run) -> list[int]:
    """Call ``run()`` with Cancel pressed during the pack's first text encode; it must raise
    ComfyUI's InterruptProcessingException. Returns the batch size of every encode that ran."""
    import comfy.model_management as mm
    import pytest

    enc_cls = pack.nodes.comfy_text_encoder.ComfyTextEncoder
    real_encode, calls = enc_cls.encode, []

    def encode(self, prompts):
        calls.append(len(prompts))
        if len(calls) == 1:
            mm.interrupt_current_processing(True)  # the user presses Cancel
        return real_encode(self, prompts)

    enc_cls.encode = encode
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run()
    finally:
        enc_cls.encode = real_encode
        mm.interrupt_current_processing(False)
    return calls
