# comfyui-mace developer / CI entry points.
#   make venv   create or update .venv (idempotent; see .ci/setup-venv.sh)
#   make test   run the default (fast) pytest selection
#   make demo   mass erasure in toy world v2 (scripts/mace_demo.py): 10 names + 2 styles erased on the
#               recommended path, the before/after table and out/demo_grid.png in ~1 min on 2 cores;
#               the v1 colour demo: make demo ARGS="--world v1"; options: make demo ARGS="--help"
# ComfyUI checkout for the integration tests: $COMFYUI_PATH, else ~/ComfyUI.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: venv test demo clean-venv

venv:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash .ci/setup-venv.sh

# pytest exit 5 = no tests collected/selected: a failure, said in words (make itself exits 2).
test: venv
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected or selected NO tests (exit 5): check pytest.ini's testpaths and -m" >&2; fi; \
	exit $$rc

demo: venv
	$(PY) -m scripts.mace_demo $(ARGS)

clean-venv:
	rm -rf $(VENV)
