# One entry point for students, instructors and CI. Every target creates .venv when missing.
#   make lab    set everything up and open the course in JupyterLab
#   make book   build the instructors' site (executes notebooks, with a cache)
#   make test   set up and run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := lessons/*.ipynb solutions/*.ipynb labs/*.ipynb
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: venv lab book book-ci test lint unit notebooks labs strip clean

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11 is required, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

lab: venv
	$(BIN)/jupyter lab lessons/

book: venv
	$(BIN)/jupyter-book build . -W --keep-going

# CI: build the site without executing (nbval has already run every notebook).
book-ci: venv
	mkdir -p _build
	sed 's/execute_notebooks: cache/execute_notebooks: "off"/' _config.yml > _build/_config_ci.yml
	$(BIN)/jupyter-book build . -W --keep-going --config _build/_config_ci.yml

lint: venv
	$(BIN)/ruff check utils tests $(NOTEBOOKS)
	$(BIN)/ruff format --check utils tests $(NOTEBOOKS)

labs: venv
	$(BIN)/python -m utils.labs

# Unit tests, lab integrity, and every lesson run end to end by nbval.
unit: venv
	$(BIN)/pytest tests lessons --nbval-lax --nbval-current-env --durations=15

test: venv lint unit book-ci

strip: venv
	$(BIN)/jupyter nbconvert --clear-output --inplace lessons/*.ipynb solutions/*.ipynb
	$(BIN)/python -m utils.labs

clean:
	rm -rf _build .cache
