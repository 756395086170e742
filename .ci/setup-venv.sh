#!/usr/bin/env bash
# Create / update the test virtualenv (.venv).  Called by `make venv`.
#
#   1. python3 -m venv .venv
#   2. torch, never a silent multi-GB CUDA download; the first that applies, and it says which:
#      a. .venv already has torch: kept as it is;
#      b. MACE_TORCH_FROM=/path/to/python (e.g. ComfyUI's venv python), or else the venv of the
#         ComfyUI checkout found below (<ComfyUI>/venv or .venv) when it has torch: that
#         Python's site-packages is put on .venv's path (a .pth line), its torch is reused and
#         pinned in the constraints;
#      c. the CPU wheel torch==2.13.0 from local wheels (pip --no-index: find-links only);
#      d. torch==2.13.0 from PyTorch's CPU index (https://download.pytorch.org/whl/cpu);
#         if that cannot be reached, stop and say how to provide a torch.
#   3. pip install -c constraints.txt -r requirements.txt -r requirements-dev.txt
#   4. if a ComfyUI checkout is found ($COMFYUI_PATH, else ~/ComfyUI; it must contain comfy/
#      and nodes.py): ComfyUI's requirements.txt minus torch/torchvision/torchaudio, plus
#      torchvision (0.28.0 unless one is already importable) and requests, all constrained
#   5. install tests/_tvshim.py into site-packages (lazy, via a .pth line) so that PyPI's
#      +cu130 torchvision imports next to the CPU torch anywhere in the venv
#
# Idempotent: a stamp file keyed on the hash of every input is written last, and a
# second run with the same inputs returns at once.  Never lets pip resolve an unpinned
# torch; never installs torchaudio.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.mace-venv-stamp"
TORCH_PIN="torch==2.13.0"
TV_PIN="torchvision==0.28.0"

find_comfyui() {
    local cand
    if [[ -n "${COMFYUI_PATH:-}" ]]; then
        cand=$COMFYUI_PATH
    else
        cand="$HOME/ComfyUI"
    fi
    if [[ -d "$cand/comfy" && -f "$cand/nodes.py" ]]; then
        (cd "$cand" && pwd)
    fi
}

COMFY=$(find_comfyui || true)

hash_inputs() {
    {
        echo "python=$("$PYTHON" -c 'import sys; print(sys.version)')"
        echo "comfy=${COMFY:-none}"
        echo "torch_from=${MACE_TORCH_FROM:-}"
        cat requirements.txt requirements-dev.txt constraints.txt .ci/setup-venv.sh tests/_tvshim.py
        if [[ -n "$COMFY" && -f "$COMFY/requirements.txt" ]]; then
            cat "$COMFY/requirements.txt"
        fi
    } | sha256sum | cut -d' ' -f1
}

HASH=$(hash_inputs)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "venv: $VENV is up to date (ComfyUI: ${COMFY:-not found})"
    exit 0
fi

t0=$(date +%s)
rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "venv: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off
# pip warns once per package about this machine's sparse local indexes; hide only that line.
pip_q() {
    "${PIP[@]}" "$@" 2> >(grep -v -E 'is ignored: it is neither a file nor a directory' >&2)
}

CONSTRAINTS="$VENV/mace-constraints.txt"
cp constraints.txt "$CONSTRAINTS"
TORCH_HOW=""
has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }
torch_version() { "$1" -c 'import torch; print(torch.__version__.split("+")[0])'; }

if has_torch "$VENV/bin/python"; then
    TORCH_HOW="kept"
    echo "venv: torch $(torch_version "$VENV/bin/python") is already in $VENV: kept"
else
    FROM=${MACE_TORCH_FROM:-}
    if [[ -z "$FROM" && -n "$COMFY" ]]; then
        for cand in "$COMFY/venv/bin/python" "$COMFY/.venv/bin/python"; do
            if [[ -x "$cand" ]] && has_torch "$cand"; then FROM=$cand; break; fi
        done
    fi
    if [[ -n "$FROM" ]]; then
        if ! has_torch "$FROM"; then
            echo "venv: MACE_TORCH_FROM=$FROM has no importable torch" >&2; exit 1
        fi
        SITE_FROM=$("$FROM" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
        SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$SITE_FROM" > "$SITE/_mace_reused_torch.pth"
        TORCH_HOW="reused"
        echo "venv: reusing torch $(torch_version "$VENV/bin/python") from $FROM ($SITE_FROM is on $VENV's path)"
    elif WHEEL_DIR=$(mktemp -d) && "${PIP[@]}" download -q --no-index --no-deps "$TORCH_PIN" \
            -d "$WHEEL_DIR" >/dev/null 2>&1 && ls "$WHEEL_DIR"/torch-*+cpu-*.whl >/dev/null 2>&1; then
        # A CPU wheel among the local wheels (find-links): install that file; its
        # dependencies resolve from the configured indexes as usual.
        pip_q install -q -c "$CONSTRAINTS" "$WHEEL_DIR"/torch-*.whl
        TORCH_HOW="local"
        echo "venv: installed $TORCH_PIN from the local CPU wheel $(basename "$WHEEL_DIR"/torch-*.whl)"
        rm -rf "$WHEEL_DIR"
    else
        rm -rf "${WHEEL_DIR:-/nonexistent}"
        echo "venv: no local CPU wheel of $TORCH_PIN; asking PyTorch's CPU index for it"
        if pip_q install -q --retries 1 --timeout 20 "$TORCH_PIN" \
                --index-url https://download.pytorch.org/whl/cpu; then
            TORCH_HOW="cpu-index"
            echo "venv: installed $TORCH_PIN (CPU build) from https://download.pytorch.org/whl/cpu"
        else
            echo "venv: could not install the CPU build of $TORCH_PIN. Provide a torch instead:" >&2
            echo "venv:   MACE_TORCH_FROM=/path/to/ComfyUI/venv/bin/python make venv   (reuse that torch)" >&2
            echo "venv:   or install torch into $VENV yourself, then run make venv again" >&2
            exit 1
        fi
    fi
fi

if [[ $TORCH_HOW == kept || $TORCH_HOW == reused ]]; then
    # Pin the torch (and torchvision) that is there, so that no requirement pulls another one.
    TV=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torchvision"))' 2>/dev/null || true)
    grep -v -i -E '^torch==' constraints.txt | { if [[ -n "$TV" ]]; then grep -v -i -E '^torchvision=='; else cat; fi; } > "$CONSTRAINTS"
    echo "torch==$(torch_version "$VENV/bin/python")" >> "$CONSTRAINTS"
    if [[ -n "$TV" ]]; then echo "torchvision==${TV%%+*}" >> "$CONSTRAINTS"; fi
fi

echo "venv: installing requirements.txt + requirements-dev.txt"
pip_q install -q -c "$CONSTRAINTS" -r requirements.txt -r requirements-dev.txt

if [[ -n "$COMFY" ]]; then
    echo "venv: ComfyUI found at $COMFY; installing its requirements (without torch/torchvision/torchaudio)"
    REQ="$VENV/comfyui-requirements-notorch.txt"
    # Drop the torch family (any version specifier), keep everything else verbatim.
    grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' \
        "$COMFY/requirements.txt" > "$REQ"
    # `requests`: app/frontend_management.py imports it but ComfyUI's requirements.txt
    # does not list it (transformers 5 no longer pulls it in).
    if "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("torchvision")' 2>/dev/null; then
        TV_ARG=()  # keep the torchvision that is there (e.g. next to a reused torch)
    else
        TV_ARG=("$TV_PIN")
    fi
    pip_q install -q -c "$CONSTRAINTS" -r "$REQ" "${TV_ARG[@]}" requests
else
    echo "venv: no ComfyUI checkout found (set COMFYUI_PATH or extract ComfyUI to ~/ComfyUI);"
    echo "venv: integration tests will be SKIPPED"
fi

# Guard: the torch in the venv must be the pinned CPU build, and torchaudio must be absent.
MACE_TORCH_HOW=$TORCH_HOW "$VENV/bin/python" - <<'PY'
import importlib.util, os, sys
import torch
if os.environ["MACE_TORCH_HOW"] in ("local", "cpu-index"):
    assert torch.__version__.split("+")[0] == "2.13.0", f"unexpected torch {torch.__version__}"
    assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
if importlib.util.find_spec("torchaudio") is not None:
    sys.exit("torchaudio is installed in the venv; it drags in a CUDA torch. Remove it.")
print(f"venv: torch {torch.__version__} (cuda={torch.version.cuda}; {os.environ['MACE_TORCH_HOW']})")
PY

# Lazy torchvision shim for the whole venv (only acts when `import torchvision` happens).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp tests/_tvshim.py "$SITE/_mace_tvshim.py"
echo "import _mace_tvshim; _mace_tvshim.install_lazy()" > "$SITE/_mace_tvshim.pth"

if [[ -n "$COMFY" ]]; then
    "$VENV/bin/python" -c 'import torchvision; print("venv: torchvision", torchvision.__version__, "imports")'
fi

echo "$HASH" > "$STAMP"
echo "venv: ready in $(( $(date +%s) - t0 )) s"
