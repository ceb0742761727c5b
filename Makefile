# make demo: set up .venv (CPU torch pinned by constraints.txt) and run the demo: strategies at equal NFEs on
#   digits-uncond, one torch thread, about 10 s after the install (the long benchmark: noisesearch bench search).
# make test: set up .venv and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[diffusers,train,dev,galaxy]"
	# the pretrained galaxy models (galaxygrad:hsc32 ...): weights only; --no-deps keeps JAX out
	$(BIN)/pip install -q --no-deps galaxygrad==0.1.9
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m noisesearch.demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests tools
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs
