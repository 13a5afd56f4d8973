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

# Main job: a tiny random InternVL in the official layout is evaluated on a held-out split, fine-tuned on a generated
# dataset (images with questions, answers and boxes, counting, two-image and text samples) through a shipped
# launcher on CPU with held-out evaluation during training, evaluated again, compared, and chatted with.
DEMO_IMAGES ?= 96
DEMO_HELDOUT ?= 60
DEMO_STEPS ?= 400
DEMO_EVAL_STEPS ?= 100
DEMO_LR ?= 2e-3
DEMO_EVAL = PYTHON=$(abspath $(PY)) GPUS=1 sh eval/evaluate.sh
demo: venv
	$(PY) tools/make_tiny_model.py $(DEMO_DIR)/model --llm qwen2 --template internvl2_5 --overwrite
	$(PY) tools/make_demo_data.py $(DEMO_DIR)/data --num-images $(DEMO_IMAGES) --heldout $(DEMO_HELDOUT)
	rm -rf $(DEMO_DIR)/run $(DEMO_DIR)/eval_before $(DEMO_DIR)/eval_after  # the demo's own previous outputs
	@echo "== held-out split, before fine-tuning"
	$(DEMO_EVAL) $(DEMO_DIR)/model $(DEMO_DIR)/data/heldout.jsonl --dynamic --max-num 2 --max-new-tokens 30 \
	  --out-dir $(DEMO_DIR)/eval_before
	@echo "== fine-tuning"
	PYTHON=$(abspath $(PY)) GPUS=1 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=4 DEEPSPEED=none \
	MODEL=$(DEMO_DIR)/model META_PATH=$(DEMO_DIR)/data/meta.json OUTPUT_DIR=$(DEMO_DIR)/run \
	  sh shell/internvl2.5/2nd_finetune/internvl2_5_1b_dynamic_res_2nd_finetune_full.sh \
	  --max_steps $(DEMO_STEPS) --learning_rate $(DEMO_LR) --warmup_ratio 0.05 --max_dynamic_patch 2 --bf16 False \
	  --grad_checkpoint False --ddp_find_unused_parameters False --save_steps 100 --dataloader_num_workers 1 \
	  --disable_tqdm True \
	  --eval_meta_path $(DEMO_DIR)/data/eval_meta.json --eval_strategy steps --eval_steps $(DEMO_EVAL_STEPS) \
	  --eval_max_samples 16 --eval_max_new_tokens 30
	$(PY) tools/plot_loss.py $(DEMO_DIR)/run
	@echo "== held-out split, after fine-tuning"
	$(DEMO_EVAL) $(DEMO_DIR)/run $(DEMO_DIR)/data/heldout.jsonl --dynamic --max-num 2 --max-new-tokens 30 \
	  --out-dir $(DEMO_DIR)/eval_after
	@echo "== before / after (in %)"
	$(PY) tools/demo_report.py $(DEMO_DIR)/eval_before $(DEMO_DIR)/eval_after --require-improvement
	@echo "== chat about a held-out picture"
	$(PY) -m internvl_chat.cli.chat $(DEMO_DIR)/run --image $(DEMO_DIR)/data/images/heldout_000.png \
	  --question "What colour is the shape?" --max-new-tokens 16
	@echo "fine-tuned checkpoint: $(DEMO_DIR)/run (log: training_log.txt, loss curve: loss_curve.png)"

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
