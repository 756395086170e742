#!/usr/bin/env bash
# Create / update the test virtualenv (.venv).  Called by `make venv`.
#
#   1. python3 -m venv .venv
#   2. pip install torch==2.13.0                      (the CPU wheel on this machine's disk)
#   3. pip install -c constraints.txt -r requirements.txt -r requirements-dev.txt
#   4. if a ComfyUI checkout is found ($COMFYUI_PATH, else ~/ComfyUI; it must contain comfy/
#      and nodes.py): ComfyUI's requirements.txt minus torch/torchvision/torchaudio, plus
#      torchvision==0.28.0 and requests, all under constraints.txt
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

echo "venv: installing $TORCH_PIN"
pip_q install -q "$TORCH_PIN"

echo "venv: installing requirements.txt + requirements-dev.txt"
pip_q install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt

if [[ -n "$COMFY" ]]; then
    echo "venv: ComfyUI found at $COMFY; installing its requirements (without torch/torchvision/torchaudio)"
    REQ="$VENV/comfyui-requirements-notorch.txt"
    # Drop the torch family (any version specifier), keep everything else verbatim.
    grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' \
        "$COMFY/requirements.txt" > "$REQ"
    # `requests`: app/frontend_management.py imports it but ComfyUI's requirements.txt
    # does not list it (transformers 5 no longer pulls it in).
    pip_q install -q -c constraints.txt -r "$REQ" "$TV_PIN" requests
else
    echo "venv: no ComfyUI checkout found (set COMFYUI_PATH or extract ComfyUI to ~/ComfyUI);"
    echo "venv: integration tests will be SKIPPED"
fi

# Guard: the torch in the venv must be the pinned CPU build, and torchaudio must be absent.
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch
assert torch.__version__.split("+")[0] == "2.13.0", f"unexpected torch {torch.__version__}"
if importlib.util.find_spec("torchaudio") is not None:
    sys.exit("torchaudio is installed in the venv; it drags in a CUDA torch. Remove it.")
print(f"venv: torch {torch.__version__} (cuda={torch.version.cuda})")
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
