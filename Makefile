# Two entry points a fresh machine needs: `make demo` and `make test`.
# Both create .venv and install the package into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch goes in first, so that nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"  # setuptools: tests/test_wheel.py builds the wheel offline
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,notebooks,docs]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mag_explore demo --out outputs/demo.png

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench_engine.py

# The course: time every notebook with its defaults; strip outputs before committing.
notebooks-time: $(VENV)/.installed
	$(PY) -m mag_explore.course.nbtools time notebooks/*.ipynb

notebooks-strip: $(VENV)/.installed
	$(PY) -m mag_explore.course.nbtools strip notebooks/*.ipynb

# The site: notebooks executed on the embedded model (cached, see mag_explore/course/nbcache.py), the
# API reference from the docstrings; warnings are errors, then the internal links are checked.
# MAG_EXPLORE_EXECUTED_DIR=dir reuses the notebooks a test run executed (CI does).
docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(PY) docs/check_links.py docs/_build/html

# The repository's address lives in pyproject.toml ([project.urls] Repository): rewrite the
# README's Colab links and every notebook's setup cell from it (a fork runs this once).
links: $(VENV)/.installed
	$(PY) -m mag_explore.course.nbtools links

.PHONY: install demo test bench notebooks-time notebooks-strip docs links
