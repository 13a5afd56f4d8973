# Entry points for a fresh machine. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= work_dirs/demo

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

# Main job: a tiny random InternVL in the official layout is fine-tuned on a generated dataset (images with
# questions, answers and boxes, two-image and text samples) through a shipped launcher, on CPU, then chatted with.
demo: venv
	$(PY) tools/make_tiny_model.py $(DEMO_DIR)/model --llm qwen2 --template internvl2_5 --overwrite
	$(PY) tools/make_demo_data.py $(DEMO_DIR)/data --num-images 24
	rm -rf $(DEMO_DIR)/run  # the demo's own previous run; a real run would resume from it
	PYTHON=$(abspath $(PY)) GPUS=1 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=4 DEEPSPEED=none \
	MODEL=$(DEMO_DIR)/model META_PATH=$(DEMO_DIR)/data/meta.json OUTPUT_DIR=$(DEMO_DIR)/run \
	  sh shell/internvl2.5/2nd_finetune/internvl2_5_1b_dynamic_res_2nd_finetune_full.sh \
	  --max_steps 120 --learning_rate 3e-3 --warmup_ratio 0.05 --max_dynamic_patch 2 --bf16 False \
	  --grad_checkpoint False --save_steps 30 --dataloader_num_workers 1 --disable_tqdm True
	$(PY) tools/make_demo_image.py $(DEMO_DIR)/demo.png
	$(PY) -m internvl_chat.cli.chat $(DEMO_DIR)/run --image $(DEMO_DIR)/data/images/shape_000.png \
	  --question "What colour is the shape?" --max-new-tokens 16
	@echo "fine-tuned checkpoint: $(DEMO_DIR)/run (log: $(DEMO_DIR)/run/training_log.txt)"

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
