#!/usr/bin/env bash
# Every stage on random-weight SD1.5 next to its reference-style baseline (bench/gpu_suite.py):
# CFR and fusion for 1/10/100 concepts, one concept's LoRA at 512 px in fp16/bf16/fp32, the
# 10-concept Mass Erase pipeline end to end, and the Erasure Check's seconds per image (sampling;
# judging at 7 and 21 candidates) with the minutes of one check derived from them ("check").
# Nothing is downloaded.
#
#   bash bench/gpu_suite.sh            # on a CUDA machine: full size, < 8 min, bench/results/gpu_suite.json
#   bash bench/gpu_suite.sh --small    # anywhere (CI, CPU): tiny UNet, < 2 min
#
# Needs the pack's Python environment (.venv, else $PYTHON, else python3) and a ComfyUI source tree:
# $COMFYUI_PATH, else ~/ComfyUI (the README's "ComfyUI for the tests" says how to get one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -z "${COMFYUI_PATH:-}" ]; then
    for d in "$HOME/ComfyUI"; do
        if [ -f "$d/comfy/model_management.py" ]; then COMFYUI_PATH=$(cd "$d" && pwd); break; fi
    done
fi
if [ -z "${COMFYUI_PATH:-}" ] || [ ! -f "$COMFYUI_PATH/comfy/model_management.py" ]; then
    echo "gpu_suite: no ComfyUI source tree; set COMFYUI_PATH or extract ComfyUI to ~/ComfyUI" >&2
    exit 2
fi
export COMFYUI_PATH
exec "$PY" -m bench.gpu_suite "$@"
