"""shared/model/archrules.py: one test per row of the table of model-specific rules, plus the
defects the architecture matrix found (attention choice, LLaMA-Pro identity and reload, DoRA on
MoE, --lora-target all coverage, the tokenizer fingerprint)."""

from __future__ import annotations

import shutil

import archmatrix
import json

import pytest
import torch
from conftest import aligned, bad, ok, shared_path

from lmforge.shared.core.commands.training import Method
from lmforge.shared.model import archrules


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """build(name) -> a tiny model directory (made once per name)."""
    work = tmp_path_factory.mktemp("rules")
    tok = archmatrix.tokenizer_dir(work / "tokenizer")
    made: dict = {}

    def build(name):
        if name not in made:
            made[name] = archmatrix.build(name, work / name, tok)
        return made[name]

    build.work = work  # type: ignore[attr-defined]
    return build


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


IDS = torch.arange(4, archmatrix.VOCAB)[None, :20]


def test_every_rule_has_a_test_here():
    names = {r.name for r in archrules.RULES}
    assert names == {"attention kernel", "soft-capped logits", "scaled logits", "scaled embeddings",
                     "router auxiliary loss", "fused experts", "per-layer config lists", "no generation marker",
                     "linear layers that are not linear"}
    for rule in archrules.RULES:   # the model types a row names are ones it applies to
        from transformers import AutoConfig

        if rule.on != "config":
            continue
        for model_type in rule.examples:
            name = next(n for n, (t, _, _) in archmatrix.ARCHS.items() if t == model_type)
            _, keys, _ = archmatrix.ARCHS[name]
            merged = {**archmatrix.BASE, **keys}
            config = AutoConfig.for_model(model_type, **{k: v for k, v in merged.items() if v is not None})
            assert rule.applies(config), (rule.name, model_type)


# --- attention kernel
def test_attention_is_chosen_per_architecture(tiny):
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.model.models import attention_for, choose_device, load_model
    from lmforge.shared.modeldir.config import load_config

    for name, want in (("gemma2", "eager"), ("gpt_oss", "eager"), ("llama", "sdpa")):
        device = choose_device("fp32", "auto")
        model = load_model(tiny(name), device, for_training=False)
        assert device.attn == want and model.config._attn_implementation == want
    with pytest.raises(BadInput) as refused:
        attention_for(load_config(tiny("gemma2")), "sdpa", "cpu", "fp32")
    assert "--attn eager" in refused.value.hint and "soft-capped" in str(refused.value)


def test_attn_option_on_commands_that_run_models(tiny, tmp_path):
    from lmforge.shared.core import catalog

    for command in ("eval mmlu", "eval generate", "eval perplexity", "eval rm", "serve", "chat", "train sft",
                    "model quantize"):
        assert any(o.name == "attn" for o in catalog.options(command)), command
    data = aligned(tmp_path, "d", archmatrix.sft_rows(4))
    packed = tmp_path / "p.arrow"
    ok(["data", "pack", data, "-m", tiny("gemma2"), "-t", "chatml", "--cutoff", "48", "-o", packed])
    line = bad(["eval", "perplexity", "-m", tiny("gemma2"), "-d", packed, "--attn", "sdpa"])
    assert "--attn eager" in line
    ok(["eval", "perplexity", "-m", tiny("gemma2"), "-d", packed, "--attn", "eager", "-q"])
    # model quantize: refused before anything loads; eager quantizes and measures
    assert "--attn eager" in bad(["model", "quantize", tiny("gemma2"), "-o", tmp_path / "q", "--attn", "sdpa"])
    ok(["model", "quantize", tiny("gemma2"), "-o", tmp_path / "q", "--method", "bnb-int8", "--calib", data,
        "--eval-samples", "2"])
    assert json.loads((tmp_path / "q" / "lmforge.json").read_text())["perplexity"]["after"] > 0


# --- soft-capped logits and scaled logits: the chunked loss
@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere", "llama"])
def test_chunked_loss_only_where_exact_and_then_equal(tiny, name):
    from lmforge.shared.train.patches import lossfn

    model = load(tiny(name), attn_implementation="eager")
    model.train()
    labels = IDS.clone()
    standard = model(IDS, labels=labels).loss
    # scaled logits reach the chunked loss through the model's forward; code that calls the output
    # layer itself (the DPO-family forward, preference.completion_logps) steps aside for them
    assert archrules.logits_scaled(model.config) == (name in ("granite", "cohere"))
    restore = lossfn.install(model)
    if name == "gemma2":   # soft-capped: not a candidate
        assert restore is None and not archrules.chunked_loss_exact(model.config)
        return
    assert restore is not None
    chunked = model(IDS, labels=labels).loss
    restore()
    assert torch.allclose(chunked, standard, atol=1e-5), (name, chunked, standard)


# --- scaled embeddings
def test_gemma_embedding_scale_survives_resizing(tiny):
    from lmforge.shared.model.models import resize_to

    model = load(tiny("gemma"))
    before = model(IDS).logits
    scale = float(model.get_input_embeddings().embed_scale)
    assert scale == pytest.approx(model.config.hidden_size ** 0.5)

    class Grown:   # a tokenizer with 3 more tokens
        def __len__(self):
            return archmatrix.VOCAB + 3

    resize_to(model, Grown())
    assert float(model.get_input_embeddings().embed_scale) == pytest.approx(scale)
    assert (model(IDS).logits[..., :archmatrix.VOCAB] - before).abs().max() < 1e-5


# --- router auxiliary loss
def test_router_loss_when_the_router_trains(tiny):
    from lmforge.shared.train import methods

    full = methods.apply(load(tiny("mixtral")), Method(method="full"))
    assert full.config.output_router_logits is True
    assert full(IDS, labels=IDS).aux_loss is not None
    frozen = methods.apply(load(tiny("mixtral")), Method(method="freeze", freeze_layers=1,
                                                                       freeze_modules="self_attn"))
    assert not frozen.config.output_router_logits     # attention only: the router does not train
    dense = methods.apply(load(tiny("llama")), Method(method="full"))
    assert not getattr(dense.config, "output_router_logits", False)


# --- linear layers that are not linear
def test_lora_all_leaves_out_linear_layers_that_return_more_than_their_product(tiny, tmp_path):
    """Phi-MoE's router is a torch Linear whose forward returns (logits, weights, experts): LoRA on it
    broke training inside PEFT. The rule is found by trying the layer, not by the model's name."""
    import torch

    from lmforge.shared.model import archrules
    from lmforge.shared.train import methods

    model = load(tiny("phimoe"))
    assert archrules.not_linear(model) == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert archrules.not_linear(load(tiny("mixtral"))) == []   # its router is a plain Linear
    wrapped = methods.apply(model, Method(method="lora"))
    adapted = methods.adapted_modules(wrapped)
    assert "model.layers.0.self_attn.q_proj" in adapted and not any("router" in n for n in adapted)
    wrapped(IDS, labels=IDS).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in wrapped.parameters() if p.requires_grad)

    class Tuple(torch.nn.Linear):   # the same rule for a layer of any model's own code
        def forward(self, x):
            return super().forward(x), x

    Tuple.__module__ = "transformers.models.custom.modeling_custom"
    dense = load(tiny("llama"))
    dense.model.layers[0].mlp.gate_proj.__class__ = Tuple
    assert archrules.not_linear(dense) == ["model.layers.0.mlp.gate_proj"]
    data = aligned(tmp_path, "d", archmatrix.sft_rows(4))
    packed = tmp_path / "p.arrow"
    ok(["data", "pack", data, "-m", tiny("phimoe"), "-t", "chatml", "--cutoff", "48", "-o", packed])
    line = bad(["train", "sft", "-m", tiny("phimoe"), "-d", packed, "-o", tmp_path / "out", "--lora-target",
                "q_proj,router", "--max-steps", "1"])
    assert "--lora-target router: PhimoeTopKRouter" in line and "leave it out" in line
    ok(["train", "sft", "-m", tiny("phimoe"), "-d", packed, "-o", tmp_path / "all", "--max-steps", "1",
        "--batch-size", "2", "--grad-accum", "1"])


# --- fused experts
def test_dora_on_fused_experts_is_refused_with_the_way_out(tiny, tmp_path):
    data = aligned(tmp_path, "d", archmatrix.sft_rows(4))
    packed = tmp_path / "p.arrow"
    ok(["data", "pack", data, "-m", tiny("mixtral"), "-t", "chatml", "--cutoff", "48", "-o", packed])
    line = bad(["train", "sft", "-m", tiny("mixtral"), "-d", packed, "-o", tmp_path / "out", "--method", "dora",
                "--max-steps", "1"])
    assert "fused tensors" in line and "--method lora" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    ok(["train", "sft", "-m", tiny("mixtral"), "-d", packed, "-o", tmp_path / "named", "--method", "dora",
        "--lora-target", "q_proj,v_proj", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"])


def test_lora_target_all_covers_every_linear_layer_of_deepseek_v3(tiny):
    from lmforge.shared.train import methods

    model = load(tiny("deepseek_v3"))
    linears = methods.linear_layers(model)
    assert "model.layers.0.mlp.down_proj" in linears and "model.layers.1.mlp.shared_experts.up_proj" in linears
    wrapped = methods.apply(model, Method(method="lora"))
    assert set(linears) <= methods.adapted_modules(wrapped)
    assert "lm_head" not in methods.adapted_modules(wrapped)


# --- per-layer config lists, and LLaMA-Pro's identity start
@pytest.mark.parametrize("name", ["smollm3", "phi", "gpt_neox", "falcon", "mixtral", "deepseek_v3", "gpt2"])
def test_llama_pro_starts_as_the_model_and_reloads(tiny, tmp_path, name):
    from lmforge.shared.train import methods

    model = load(tiny(name), attn_implementation="eager").eval()
    before = model(IDS).logits
    methods.apply(model, Method(method="llama-pro", expand_layers=1))
    model.eval()
    assert (model(IDS).logits - before).abs().max() < 1e-5
    model.save_pretrained(str(tmp_path / "pro"))
    again = load(tmp_path / "pro", attn_implementation="eager").eval()
    assert again.config.num_hidden_layers == 3
    assert (again(IDS).logits - before).abs().max() < 1e-5
    if name == "smollm3":
        assert again.config.no_rope_layers == [1, 0, 0]


def test_llama_pro_refuses_an_expansion_that_is_not_the_identity(tiny, monkeypatch):
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train import methods

    monkeypatch.setattr(methods, "_output_projections", lambda model, layer, probe: ["mlp.down_proj.weight"])
    with pytest.raises(BadInput, match="not the original"):
        methods.apply(load(tiny("llama")), Method(method="llama-pro", expand_layers=1))


# --- the tokenizer fingerprint
def test_fingerprint_is_what_tokenizes_not_the_class(tiny, tmp_path):
    from lmforge.shared.modeldir.tokenizers import fingerprint, load_tokenizer

    seen = {}
    for name in ("llama", "gemma", "gpt2", "phi", "smollm3", "gpt_oss"):
        tokenizer = load_tokenizer(tiny(name))
        seen[name] = (fingerprint(tokenizer), tokenizer("the cat runs").input_ids)
    assert len({f for f, _ in seen.values()}) == 1
    other = tmp_path / "other"
    shutil.copytree(tiny("llama"), other)
    changed = load_tokenizer(other)
    changed.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprint(changed) != seen["llama"][0]
    # data packed with one model trains another whose tokenizer files are the same
    data = aligned(tmp_path, "d", archmatrix.sft_rows(4))
    packed = tmp_path / "p.arrow"
    ok(["data", "pack", data, "-m", tiny("llama"), "-t", "chatml", "--cutoff", "48", "-o", packed])
    ok(["train", "sft", "-m", tiny("gemma"), "-d", packed, "-o", tmp_path / "run", "--max-steps", "1",
        "--batch-size", "2", "--grad-accum", "1"])


def test_saved_sentencepiece_tokenizer_loads_back_alike(tmp_path):
    """A full fine-tune re-saves the tokenizer: stories260K's (Llama sentencepiece, `legacy`) must
    load back with the same fingerprint, so data packed for the base trains the result too
    (transformers 5 leaves `legacy` out of the saved config; save_tokenizer writes it back)."""
    from lmforge.shared.modeldir.tokenizers import fingerprint, load_tokenizer, save_tokenizer

    base = shared_path("models/stories260K")
    if not base.exists():
        pytest.skip(f"{base} not found (set LMFORGE_SHARED)")
    tokenizer = load_tokenizer(str(base))
    plain = tmp_path / "plain"
    tokenizer.save_pretrained(str(plain))
    checked = tmp_path / "checked"
    save_tokenizer(tokenizer, checked)
    assert fingerprint(load_tokenizer(str(checked))) == fingerprint(tokenizer)
    if fingerprint(load_tokenizer(str(plain))) == fingerprint(tokenizer):
        pytest.skip("this transformers keeps `legacy` on saving: nothing to repair")


# --- no generation marker
OLD_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def test_template_without_generation_marker_prompts_with_the_answer_header(tmp_path):
    """A ChatML template that ignores add_generation_prompt: the assistant header is found by
    rendering an answer, never trained, and ends every generation prompt; with the marker, nothing
    changes (the rule does not apply)."""
    from lmforge.shared.data.jinja_template import JinjaRenderer
    from lmforge.shared.modeldir.tokenizers import load_tokenizer

    base = shared_path("tokenizers/qwen3")
    if not base.exists():
        pytest.skip(f"{base} not found (set LMFORGE_SHARED)")
    tokenizer = load_tokenizer(str(base))
    assert not archrules._no_generation_marker(tokenizer)      # Qwen3's template has the marker
    with_marker = JinjaRenderer(load_tokenizer(str(base)))
    tokenizer.chat_template = OLD_CHATML
    assert archrules._no_generation_marker(tokenizer)
    r = JinjaRenderer(tokenizer)
    assert r.implied_header == "<|im_start|>assistant\n"
    assert with_marker.implied_header == ""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]
    rendered = r.conversation(turns)
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["hello<|im_end|>", "yes<|im_end|>"]
    assert r.generation_prompt(turns[:1]).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # the first answer's span as the template with the marker gives (Qwen3 adds think blocks later)
    plain = with_marker.conversation(turns)
    assert plain.text[plain.spans[0][0]:plain.spans[0][1]] == "hello<|im_end|>"
    # without the rule, the header would be trained and missing from the prompt
    r.implied_header = ""
    assert r.conversation(turns).text[slice(*r.conversation(turns).spans[0])].startswith("<|im_start|>assistant")
