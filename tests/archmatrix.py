"""Tiny randomly initialised models of many decoder architectures, built from the installed
transformers' configs (nothing downloaded), for the architecture matrix (tests/test_archs.py).

Every model shares one word-level tokenizer with ChatML markers, so data packed once serves all
of them (their tokenizer files are byte-identical whatever the model type)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog bird fish red blue green big small runs sits eats sleeps on in under tree box "
         "house one two three four five yes no what is color animal where name say repeat word and "
         "user assistant system hello world").split()
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
VOCAB = 1 + len(SPECIALS) + len(WORDS)

# common tiny sizes; each architecture's own keys below
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# name -> (model_type, config keys, features the matrix covers)
ARCHS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "llama": ("llama", {}, ("dense",)),
    "mistral": ("mistral", {"sliding_window": 16}, ("dense", "sliding window")),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, ("dense", "tied")),
    "qwen3": ("qwen3", {}, ("dense", "qk-norm")),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  ("moe",)),
    "mixtral": ("mixtral", {**MOE}, ("moe",)),
    "phimoe": ("phimoe", {**MOE}, ("moe", "router returns a tuple")),
    "deepseek_v3": ("deepseek_v3", {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                                    "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
                                    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                                    "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4},
                    ("moe", "shared experts", "MLA")),
    "gemma": ("gemma", {"tie_word_embeddings": True}, ("dense", "tied", "scaled embeddings")),
    "gemma2": ("gemma2", {"tie_word_embeddings": True, "sliding_window": 16, "final_logit_softcapping": 30.0,
                          "attn_logit_softcapping": 50.0},
               ("dense", "tied", "soft-capped logits", "sliding window")),
    "gemma3_text": ("gemma3_text", {"tie_word_embeddings": True, "sliding_window": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]},
                    ("dense", "tied", "sliding window")),
    "phi": ("phi", {"partial_rotary_factor": 0.5}, ("dense", "parallel block")),
    "phi3": ("phi3", {}, ("dense", "fused qkv")),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "n_inner": 64,
                      "tie_word_embeddings": True}, ("dense", "tied", "Conv1D")),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5}, ("dense", "parallel block")),
    "falcon": ("falcon", {"head_dim": None, "num_kv_heads": 2, "new_decoder_architecture": True, "alibi": False},
               ("dense", "parallel block")),
    "starcoder2": ("starcoder2", {"sliding_window": 16}, ("dense", "sliding window")),
    "olmo2": ("olmo2", {}, ("dense", "post-norm")),
    "granite": ("granite", {"embedding_multiplier": 2.0, "logits_scaling": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.25}, ("dense", "scaled logits")),
    "cohere": ("cohere", {"tie_word_embeddings": True, "logit_scale": 0.5}, ("dense", "tied", "scaled logits")),
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.5}, ("dense",)),
    "internlm3": ("internlm3", {}, ("dense",)),
    "smollm3": ("smollm3", {"tie_word_embeddings": True, "no_rope_layers": [1, 0], "no_rope_layer_interval": 2},
                ("dense", "tied", "no-RoPE layers")),
    "gpt_oss": ("gpt_oss", {**MOE, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
                ("moe", "attention sinks", "sliding window")),
}


def tokenizer_dir(directory: Path) -> Path:
    from conftest import word_tokenizer

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return word_tokenizer(directory, list(WORDS), SPECIALS, eos="<|im_end|>", chat_template=template)


def build(name: str, directory: Path, tokenizer: Path, seed: int = 0) -> Path:
    """Save a tiny random `name` model with the shared tokenizer into `directory`."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, keys, _ = ARCHS[name]
    ids = dict(bos_token_id=None, eos_token_id=2, pad_token_id=3)   # <|im_end|>, <|endoftext|>
    config = AutoConfig.for_model(model_type, **{k: v for k, v in {**BASE, **ids, **keys}.items() if v is not None})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny: make the weights large enough that every layer matters
        for pname, p in model.named_parameters():
            if p.ndim >= 2 and "norm" not in pname:
                p.normal_(0, 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    for f in tokenizer.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def sft_rows(n: int = 24) -> list[dict]:
    """Alpaca rows in the tokenizer's words (deterministic)."""
    animals, colors, places = ["cat", "dog", "bird", "fish"], ["red", "blue", "green"], ["tree", "box", "house"]
    rows = []
    for i in range(n):
        a, c, p = animals[i % 4], colors[i % 3], places[(i // 4) % 3]
        rows.append({"instruction": f"what color is the {a}", "input": f"the {a} sits in the {p}",
                     "output": f"the {a} is {c}"})
    return rows


METHODS = ("lora", "dora", "freeze", "llama-pro", "full")
DORA_FUSED = "refused: fused experts (use lora)"
# what the matrix expects of each (architecture, method) beyond "yes"; tests/test_archs.py checks every cell
EXPECTED = {("mixtral", "dora"): DORA_FUSED, ("qwen3_moe", "dora"): DORA_FUSED, ("deepseek_v3", "dora"): DORA_FUSED}


def expected(name: str, method: str) -> str:
    return EXPECTED.get((name, method), "yes")


def attention(name: str) -> str:
    """What `--attn auto` picks on a CPU for this architecture."""
    from lmforge.shared.model.models import attention_for
    from transformers import AutoConfig

    model_type, keys, _ = ARCHS[name]
    return attention_for(AutoConfig.for_model(model_type), "auto", "cpu", "fp32")


BEGIN, END = "<!-- arch-matrix:begin (tests/archmatrix.py writes this table) -->", "<!-- arch-matrix:end -->"


def table() -> str:
    """The architectures guide's table: what the matrix checks, architecture by architecture."""
    import transformers

    head = ["architecture", "covers", "attention (auto, CPU)", *METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, (_, _, covers) in ARCHS.items():
        cells = [f"`{name}`", ", ".join(covers), attention(name), *(expected(name, m) for m in METHODS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, f"Checked with transformers {transformers.__version__.split('+')[0]} "
                             "(`tests/test_archs.py`):", "", *lines, END])


def readme_section(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN):text.index(END) + len(END)]


if __name__ == "__main__":   # python tests/archmatrix.py: rewrite the architectures guide's table
    readme = Path(__file__).resolve().parent.parent / "docs" / "guides" / "architectures.md"
    text = readme.read_text(encoding="utf-8")
    old = readme_section(text)
    if old is None:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers")
    readme.write_text(text.replace(old, table()), encoding="utf-8")
    print(f"{readme}: architecture table rewritten")
