# Entry points for a fresh machine. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= work_dirs/tiny-internvl

.PHONY: venv demo test clean

$(VENV)/.installed: requirements.txt requirements/*.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and alone: the pinned CPU build must be in place before anything can ask for another one
	$(PIP) install -q -c constraints.txt torch
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q -c constraints.txt --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Main job: build a tiny random InternVL in the official layout and chat with it.
demo: venv
	$(PY) tools/make_tiny_model.py $(DEMO_DIR) --llm qwen2 --template internvl2_5 --overwrite
	$(PY) tools/make_demo_image.py $(DEMO_DIR)/demo.png
	$(PY) -m internvl_chat.cli.chat $(DEMO_DIR) --image $(DEMO_DIR)/demo.png --question "Describe this image." --max-new-tokens 16

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
