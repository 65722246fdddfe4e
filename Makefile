# One entry point for students, instructors and CI. Every target creates .venv when missing.
#   make lab               set everything up and open the course in JupyterLab (lessons/ and labs/)
#   make book              build the students' site: lessons and labs, no solutions
#   make book-instructor   build the instructors' site: lessons, labs and reference solutions
#   make test              set up and run the whole test suite (what CI runs)
#   make mutate            mutation-test the utils unit tests (on demand, not CI; MODULES="quantization …")
# Options:
#   LAB_ARGS="--no-browser --port 8889 --ip 0.0.0.0 --allow-root"   passed to `jupyter lab`
#   COURSE_PROFILE=full    the slower, more faithful profile (own cache and build folder)
#   PYTHON=/path/to/python3.11
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# The Python version CI tests; another one is refused unless ALLOW_UNTESTED_PYTHON=1.
TESTED_PYTHON := 3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := lessons/*.ipynb solutions/*.ipynb labs/*.ipynb
LAB_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
export COURSE_PROFILE ?= fast

.PHONY: venv lab book book-instructor book-ci site-test browser test lint unit notebooks labs \
	strip clean mutate

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import os, sys; v = "%d.%d" % sys.version_info[:2]; \
	ok = v == "$(TESTED_PYTHON)" or os.environ.get("ALLOW_UNTESTED_PYTHON") == "1"; \
	sys.exit(0 if ok else f"Python $(TESTED_PYTHON) is required (the version CI tests), found {v} at {sys.executable}. Use make PYTHON=/path/to/python$(TESTED_PYTHON) ..., or ALLOW_UNTESTED_PYTHON=1 to try another version.")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Rooted at the repository so that lessons/, labs/ and solutions/ are all reachable;
# the browser opens on lessons/.
lab: venv
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/lessons \
		$(LAB_ARGS)

# Executes the notebooks (cached per profile in _build/.jupyter_cache/<profile>/).
book: venv
	$(BIN)/python tools/book.py --site student

book-instructor: venv
	$(BIN)/python tools/book.py --site instructor

# CI: build both sites without executing (nbval has already run every notebook).
book-ci: venv
	$(BIN)/python tools/book.py --site student --no-execute
	$(BIN)/python tools/book.py --site instructor --no-execute

# Headless-Chromium test of the sites book-ci built (skips with a message when no browser).
site-test: venv
	$(BIN)/pytest tests/test_site.py -rs

# Installs Debian's chromium and chromium-driver for the site test when missing and apt is usable.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "browser: $$(chromium --version)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null && echo "browser: $$(chromium --version)"; } \
		|| echo "browser: apt-get install chromium chromium-driver failed; the site test will be skipped"; \
	else \
		echo "browser: none; the site test will be skipped. Install one with:"; \
		echo "  sudo apt-get install chromium chromium-driver"; \
	fi

lint: venv
	$(BIN)/ruff check utils tests tools $(NOTEBOOKS)
	$(BIN)/ruff format --check utils tests tools $(NOTEBOOKS)

labs: venv
	$(BIN)/python -m utils.labs

# Unit tests, lab integrity, and every lesson run end to end by nbval.
unit: venv
	$(BIN)/pytest tests lessons --ignore=tests/test_site.py --nbval-lax --nbval-current-env \
		--durations=15

test: venv lint unit book-ci site-test

# How many plausible bugs in utils do the unit tests catch? Minutes per module; see tools/mutate.py.
MODULES ?=
mutate: venv
	$(BIN)/python tools/mutate.py $(MODULES)

strip: venv
	$(BIN)/jupyter nbconvert --clear-output --inplace lessons/*.ipynb solutions/*.ipynb
	$(BIN)/python -m utils.labs

clean:
	rm -rf _build .cache
