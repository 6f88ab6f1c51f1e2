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

.PHONY: install test test-fast lint typecheck constraints demo completions bench bench-gpu clean-demo lf-venv

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(if $(CONSTRAINTS),grep -v '^torch==' $(CONSTRAINTS) >> $(VENV)/constraints.txt)
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
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

test: lint typecheck
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: lint typecheck
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

constraints: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' | LC_ALL=C sort > .ci/constraints.txt

completions: install
	$(LM) completion bash > completions/lmforge.bash
	$(LM) completion zsh > completions/_lmforge
	$(LM) completion fish > completions/lmforge.fish

# ---------------------------------------------------------------- the built-in demo
# The whole pipeline on the project's own data and a model made by `lmforge model init`:
#   data align -> data merge/split -> data pack (pt, sft, dpo) -> train pt -> train sft (lora)
#   -> adapter merge -> train dpo (lora) -> eval generate (before vs after) -> serve one request.
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
else
OUT      ?= demo-out-$(notdir $(MODEL))
BASE     := $(MODEL)
TEMPLATE ?= auto
PT_ARGS  ?= --method lora --learning-rate 2e-4 --max-steps 20 --batch-size 4 --grad-accum 1
SFT_ARGS ?= --method lora --lora-target all --learning-rate 5e-4 --max-steps 60 --batch-size 4 --grad-accum 1
DPO_ARGS ?= --method lora --lora-target all --learning-rate 1e-4 --max-steps 20 --batch-size 4 --grad-accum 1
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

$(OUT)/eval-before.json: $(OUT)/eval.arrow $(BASE_READY)
	$(LM) eval generate -m $(BASE) -d $< --template $(TEMPLATE) $(EVAL) > $@.tmp && mv $@.tmp $@
$(OUT)/eval-sft.json: $(OUT)/eval.arrow $(OUT)/sft/lmforge.json
	$(LM) eval generate -m $(OUT)/sft -d $< $(EVAL) > $@.tmp && mv $@.tmp $@
$(OUT)/eval-dpo.json: $(OUT)/eval.arrow $(OUT)/dpo/lmforge.json
	$(LM) eval generate -m $(OUT)/sft --adapter $(OUT)/dpo -d $< $(EVAL) > $@.tmp && mv $@.tmp $@

$(OUT)/served.txt: $(OUT)/dpo/lmforge.json
	$(BIN)/python tests/demo.py --serve-once $(OUT)/sft $(OUT)/dpo > $@.tmp && mv $@.tmp $@

demo: $(OUT)/eval-before.json $(OUT)/eval-sft.json $(OUT)/eval-dpo.json $(OUT)/served.txt
	@echo
	@echo "== made in $(OUT)/"
	@echo "   data:     tasks/chat/prefs/corpus/eval.arrow (aligned), sft.arrow (merged), split/, *.packed"
	@echo "   models:   $(if $(MODEL),$(MODEL) (base),init/ (model init))  pt/ (train pt)  sft-lora/ (train sft)"
	@echo "             sft/ (adapter merge)  dpo/ (train dpo adapter)"
	@echo "== one request through lmforge serve (sft + dpo adapter):"
	@sed 's/^/   /' $(OUT)/served.txt
	@echo "== eval generate on held-out tasks, before and after training:"
	@$(BIN)/python tests/demo.py --table before=$(OUT)/eval-before.json \
		"after sft"=$(OUT)/eval-sft.json "after dpo"=$(OUT)/eval-dpo.json | sed 's/^/   /'

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

# LLaMA-Factory in its own virtualenv (it needs torch 2.11 for torchaudio): a peer to measure against
lf-venv: .bench/lf-venv/bin/llamafactory-cli
.bench/lf-venv/bin/llamafactory-cli:
	$(PYTHON) -m venv .bench/lf-venv
	.bench/lf-venv/bin/python -m pip install -q --upgrade pip
	.bench/lf-venv/bin/python -m pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0 llamafactory==0.9.5
