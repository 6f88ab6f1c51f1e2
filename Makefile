# lmforge -- `make demo` runs the pipeline on the built-in demo; `make test` runs the tests.
# Both set everything up on a fresh machine (a virtualenv in .venv, torch pinned first).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= test,cpu-extras
OUT    ?= demo-out
LM     := $(BIN)/lmforge

.PHONY: install test test-fast demo completions bench clean-demo lf-venv

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: install
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

completions: install
	$(LM) completion bash > completions/lmforge.bash
	$(LM) completion zsh > completions/_lmforge
	$(LM) completion fish > completions/lmforge.fish

# ---------------------------------------------------------------- the built-in demo
# Every target is a real file, so `make demo` reruns only what changed.

$(OUT)/raw/tasks.jsonl: shared/demo.py | install
	$(BIN)/python -m lmforge.shared.demo $(OUT)/raw

$(OUT)/tasks.arrow: $(OUT)/raw/tasks.jsonl
	$(LM) data align $< -o $@

$(OUT)/chat.arrow: $(OUT)/raw/tasks.jsonl
	$(LM) data align $(OUT)/raw/chat.json -o $@

$(OUT)/sft.arrow: $(OUT)/tasks.arrow $(OUT)/chat.arrow
	$(LM) data merge $^ --mix interleave-over -o $@

$(OUT)/split/train.arrow: $(OUT)/sft.arrow
	$(LM) data split $< --val-size 0.1 -o $(OUT)/split

demo: $(OUT)/split/train.arrow
	@echo "== aligned and merged: $(OUT)/sft.arrow"
	$(LM) data show $(OUT)/sft.arrow --stats
	$(LM) data show $(OUT)/split/train.arrow --rows 2

clean-demo:
	rm -rf $(OUT)

bench: install
	$(BIN)/python tests/bench/run.py

# LLaMA-Factory in its own virtualenv (it needs torch 2.11 for torchaudio): a peer to measure against
lf-venv: .bench/lf-venv/bin/llamafactory-cli
.bench/lf-venv/bin/llamafactory-cli:
	$(PYTHON) -m venv .bench/lf-venv
	.bench/lf-venv/bin/python -m pip install -q --upgrade pip
	.bench/lf-venv/bin/python -m pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0 llamafactory==0.9.5
