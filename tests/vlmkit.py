"""Tiny vision-language models and generated image data for the VLM tests (no hub downloads)."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def square_png(colour: str, rng: random.Random, size: tuple[int, int] = (56, 56)) -> bytes:
    """A coloured square at a random place on a light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (235, 235, 235))
    small = min(size)
    side = rng.randint(small * 3 // 5, small * 9 // 10)
    x, y = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=COLOURS[colour])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def colour_rows(directory: Path, n: int, seed: int, sizes=((56, 56),)) -> Path:
    """LLaMA-Factory style rows (an images column of relative paths, <image> placeholders)."""
    rng = random.Random(seed)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        name = f"img/{seed}-{i}.png"
        (directory / name).write_bytes(square_png(colour, rng, sizes[i % len(sizes)]))
        rows.append({"instruction": "<image>What colour is the square?", "output": colour, "images": [name]})
    path = directory / f"colours-{seed}.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
WORDS = ["system", "user", "assistant", "What", "colour", "is", "the", "square", "?", "Describe", ".", "A", "dot",
         *sorted(COLOURS)]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised Qwen2-VL (tiny text and vision sizes) with its real image processor
    class and a word-level tokenizer that has Qwen's vision tokens, saved as a model directory."""
    import torch
    from conftest import word_tokenizer
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    word_tokenizer(directory, WORDS, SPECIALS, eos="<|im_end|>", chat_template=TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(directory))
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16).save_pretrained(str(directory))
    return directory


def llava(directory: Path, seed: int = 0) -> Path:
    """A tiny LLaVA (CLIP vision tower, Llama language model) with CLIP's image processor class."""
    import torch
    from conftest import word_tokenizer
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    word_tokenizer(directory, WORDS, [*SPECIALS, "<image>"], eos="<|im_end|>", chat_template=TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(directory))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=42, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(str(directory))
    CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}).save_pretrained(str(directory))
    return directory


def gemma3(directory: Path, seed: int = 0) -> Path:
    """A tiny Gemma 3 image-text model (SigLIP vision tower) with Gemma 3's image processor class."""
    import torch
    from conftest import word_tokenizer
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    word_tokenizer(directory, WORDS, [*SPECIALS, "<start_of_image>", "<image_soft_token>", "<end_of_image>"],
                   eos="<|im_end|>", chat_template=TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(directory))
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         sliding_window=64),
        mm_tokens_per_image=4, image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"))
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).save_pretrained(str(directory))
    Gemma3ImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(str(directory))
    return directory


def qwen_vl(directory: Path, family: str, seed: int = 0) -> Path:
    """Qwen2.5-VL or Qwen3-VL, tiny and random, with Qwen's image processor class."""
    import torch
    from conftest import word_tokenizer
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    word_tokenizer(directory, WORDS, SPECIALS, eos="<|im_end|>", chat_template=TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(directory))
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=tok.eos_token_id)
    patch = 14 if family == "qwen2_5_vl" else 16
    if family == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
    config = AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                  image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(min_pixels=(2 * patch) ** 2, max_pixels=(2 * patch) ** 2 * 16, patch_size=patch,
                             merge_size=2).save_pretrained(str(directory))
    return directory
