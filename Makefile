# comfyui-mace developer / CI entry points.
#   make venv   create or update .venv (idempotent; see .ci/setup-venv.sh)
#   make test   run the default (fast) pytest selection
#   make demo   run scripts/mace_demo.py, e.g. make demo ARGS="--help"
# ComfyUI checkout for the integration tests: $COMFYUI_PATH, else ~/ComfyUI.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: venv test demo clean-venv

venv:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash .ci/setup-venv.sh

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m scripts.mace_demo $(ARGS)

clean-venv:
	rm -rf $(VENV)
