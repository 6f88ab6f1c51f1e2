"""A LLaMA-Factory training YAML (`llamafactory-cli train x.yaml`) as an lmforge job: align the
dataset_info.json entries it names (merged when it interleaves them, split when it holds out
`val_size`), pack them with its template and cutoff, and train.

Each key is mapped to options of those steps, taken as what lmforge does anyway (SAME), left out
with one warning line each (IGNORED: it changes speed, memory or logging, not what is learned), or
refused, all refused keys in one error line (REFUSED: leaving it out would train something else).
Where LLaMA-Factory's default differs from lmforge's for something that changes what is learned
(learning rate, batch, cutoff, schedule, ...), the job sets LLaMA-Factory's. docs/guides/job-files.md
holds the table; tests/test_jobs.py checks it against these names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.shared.core import jobs, log
from lmforge.shared.core.config import read_mapping
from lmforge.shared.core.errors import BadInput, close_names

STAGES = {"pt": "train pt", "sft": "train sft", "rm": "train rm", "dpo": "train dpo", "kto": "train dpo",
          "ppo": "train ppo"}
# LLaMA-Factory's template names whose lmforge template has another name; a name both know maps
# to itself (TEMPLATE_SAME), any other to `auto`, the model's own chat template (with a warning)
TEMPLATES = {"qwen3_nothink": "qwen3-nothink", "smollm": "chatml", "smollm2": "smollm"}
TEMPLATE_SAME = ("default", "alpaca", "chatml", "qwen", "qwen3", "llama2", "llama3", "mistral", "gemma", "phi")
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_8bit": "adamw8bit",
              "adamw_bnb_8bit": "adamw8bit", "paged_adamw_8bit": "paged_adamw8bit"}
ATTENTION = {"auto": "auto", "disabled": "eager", "eager": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
DEEPSPEED = {"ds_z2_config.json": "z2", "ds_z3_config.json": "z3", "ds_z3_offload_config.json": "z3-offload"}
# LLaMA-Factory (and transformers) defaults that change what is learned, where lmforge's differ
DEFAULTS = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
            "lr_scheduler_type": "linear", "cutoff_len": 2048}

# keys whose LLaMA-Factory meaning lmforge has without an option (value -> whether it is that meaning)
SAME = {
    "do_train": lambda v: v is True, "plot_loss": lambda v: True, "overwrite_output_dir": lambda v: True,
    "overwrite_cache": lambda v: True, "save_only_model": lambda v: v is False, "use_fast_tokenizer": lambda v: v is True,
    "low_cpu_mem_usage": lambda v: True, "eval_strategy": lambda v: v in ("no", "steps"),
    "evaluation_strategy": lambda v: v in ("no", "steps"), "save_strategy": lambda v: v == "steps",
    "logging_strategy": lambda v: v == "steps", "double_quantization": lambda v: v is True,
    "quantization_type": lambda v: v == "nf4", "model_revision": lambda v: v == "main",
    "badam_mode": lambda v: v == "layer", "galore_proj_type": lambda v: v == "std",
    "freeze_language_model": lambda v: v is False, "create_new_adapter": lambda v: v is False,
    "do_predict": lambda v: v is False, "predict_with_generate": lambda v: v is False,
    "train_from_scratch": lambda v: v is False, "use_llama_pro": lambda v: v is False,
    "dpo_label_smoothing": lambda v: not v, "pref_bco_weight": lambda v: not v, "resize_vocab": lambda v: v is False,
    "streaming": lambda v: v is False, "quantization_method": lambda v: v in ("bnb", "bitsandbytes"),
    "pissa_convert": lambda v: v is True,
}
# keys lmforge leaves out, and why (speed, memory, logging or hub access: not what is learned)
IGNORED = {
    "trust_remote_code": "lmforge loads models with transformers' own classes (no remote code)",
    "preprocessing_batch_size": "lmforge batches tokenization its own way",
    "dataloader_num_workers": "lmforge loads packed rows in the training process",
    "ddp_timeout": "lmforge keeps torch.distributed's timeout",
    "save_total_limit": "lmforge keeps its last checkpoint for --resume and removes checkpoints at the end "
                        "(--keep-checkpoints keeps them)",
    "per_device_eval_batch_size": "lmforge evaluates with the training batch size",
    "galore_layerwise": "lmforge's GaLore steps every layer together",
    "badam_verbose": "logging only", "badam_start_block": "lmforge starts BAdam at the first block",
    "use_unsloth_gc": "checkpointing is --gradient-checkpointing / --checkpointing",
    "use_reentrant_gc": "lmforge chooses the checkpointing implementation",
    "upcast_layernorm": "numerics of a few layers; lmforge keeps the model's dtypes",
    "upcast_lmhead_output": "numerics of the head; lmforge keeps the model's dtypes",
    "print_param_status": "logging only", "include_effective_tokens_per_second": "logging only",
    "include_tokens_per_second": "logging only", "include_num_input_tokens_seen": "logging only",
    "run_name": "tracker naming", "logging_dir": "lmforge logs to the output directory",
    "logging_first_step": "logging only", "disable_tqdm": "logging only", "cache_dir": "Hugging Face cache location",
    "hf_hub_token": "use `huggingface-cli login` or HF_TOKEN", "ms_hub_token": "ModelScope is not used",
    "om_hub_token": "Modelers is not used", "dataloader_pin_memory": "speed only",
    "ddp_find_unused_parameters": "distributed launch detail", "tokenized_path": "lmforge keeps packed data as "
    "the job's pack step output", "data_shared_file_system": "distributed launch detail",
    "eval_on_each_dataset": "lmforge evaluates on the held-out rows together", "pissa_iter": "lmforge's PiSSA "
    "initialisation uses peft's default", "pissa_convert": "lmforge saves PiSSA converted to a plain LoRA of the "
    "original base",
    "media_dir": "images are read beside the dataset files",
    "ppo_buffer_size": "lmforge's PPO batch is per_device_train_batch_size x gradient_accumulation_steps",
    "ppo_whiten_rewards": "lmforge whitens advantages (whiten_advantages), not rewards",
    "do_eval": "the held-out data (val_size, eval_dataset) is evaluated during and after training",
    "tf32": "speed only", "torch_compile": "speed only", "data_seed": "the data follows seed",
    "remove_unused_columns": "packed data holds only what training reads", "save_safetensors": "lmforge saves "
    "safetensors", "push_to_hub": "upload the output directory yourself", "hub_model_id": "upload the output "
    "directory yourself", "full_determinism": "lmforge seeds every run",
    "eval_strategy": "lmforge evaluates every eval_steps", "evaluation_strategy": "lmforge evaluates every eval_steps",
    "save_strategy": "lmforge checkpoints every save_steps", "logging_strategy": "lmforge logs every logging_steps",
    "use_fast_tokenizer": "lmforge uses the fast tokenizer", "save_only_model": "lmforge's checkpoints keep the "
    "optimizer state (for --resume)",
}
# keys that would train something else were they left out: refused while they are set
REFUSED = {
    "adapter_name_or_path": "continuing an adapter: merge it first (`lmforge adapter merge`) and train on the result",
    "use_llama_pro": "LLaMA-Factory trains a model expanded beforehand; lmforge expands it itself: "
                     "`train sft --method llama-pro --expand-layers N` on the unexpanded model",
    "train_from_scratch": "lmforge trains from a model's weights (`lmforge model init` makes new ones)",
    "use_apollo": "APOLLO is not an lmforge method", "use_adam_mini": "Adam-mini is not an lmforge optimizer",
    "use_muon": "Muon is not an lmforge optimizer", "use_dft_loss": "DFT loss is not an lmforge loss",
    "mixture_of_depths": "mixture-of-depths is not an lmforge method",
    "dpo_label_smoothing": "label smoothing is not an lmforge DPO option", "pref_bco_weight": "BCO is not an lmforge "
    "loss", "ld_alpha": "LD-DPO is not an lmforge loss", "ref_model": "lmforge's reference is the model being trained "
    "(without its adapter)", "ref_model_adapters": "lmforge's reference is the base model",
    "reward_model_adapters": "give the reward model directory", "default_system": "lmforge templates keep their own "
    "system prompt", "tool_format": "lmforge templates keep their own tool format",
    "additional_target": "lmforge trains the LoRA target modules only", "create_new_adapter": "lmforge trains one "
    "adapter", "do_predict": "prediction is `lmforge eval generate`", "predict_with_generate": "prediction is "
    "`lmforge eval generate`", "resize_vocab": "lmforge keeps the vocabulary", "add_tokens": "lmforge keeps the "
    "vocabulary", "add_special_tokens": "lmforge keeps the vocabulary", "new_special_tokens_config": "lmforge keeps "
    "the vocabulary", "quantization_method": "lmforge quantizes the base with bitsandbytes only",
    "quantization_type": "lmforge's 4-bit base is NF4", "double_quantization": "lmforge's 4-bit base is double "
    "quantized", "model_revision": "give the revision's directory (download it first)", "badam_mode": "lmforge's "
    "BAdam is layer-wise", "galore_proj_type": "lmforge's GaLore uses the standard projection",
    "freeze_language_model": "lmforge trains the language model", "streaming": "lmforge aligns the data into a file",
    "reward_model_type": "the reward model is a directory (`lmforge train rm`)",
    "lr_scheduler_kwargs": "lmforge's schedules take no extra arguments", "adam_beta1": "lmforge keeps the "
    "optimizer's betas", "adam_beta2": "lmforge keeps the optimizer's betas", "adam_epsilon": "lmforge keeps the "
    "optimizer's epsilon", "label_smoothing_factor": "lmforge trains without label smoothing",
    "oft_rank": "OFT is not an lmforge method", "oft_block_size": "OFT is not an lmforge method",
    "oft_target": "OFT is not an lmforge method", "module_dropout": "OFT is not an lmforge method",
    "use_kt": "KTransformers is not used", "use_mca": "Megatron is not used",
}


# keys of one stage family: set for another stage, they are named as left out
DPO_KEYS = ("pref_beta", "pref_loss", "pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight")
PPO_KEYS = ("reward_model", "ppo_epochs", "ppo_target", "ppo_score_norm", "max_new_tokens", "top_k", "top_p",
            "temperature")
# every key the translation reads (docs/guides/job-files.md gives each its option)
MAPPED = (
    "model_name_or_path", "stage", "do_train", "finetuning_type", "output_dir",
    "dataset", "dataset_dir", "eval_dataset", "max_samples", "mix_strategy", "interleave_probs", "val_size",
    "template", "cutoff_len", "packing", "neat_packing", "train_on_prompt", "mask_history", "enable_thinking",
    "preprocessing_num_workers", "image_max_pixels", "image_min_pixels",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "loraplus_lr_ratio", "use_dora",
    "pissa_init", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "use_galore",
    "galore_rank", "galore_scale", "galore_update_interval", "galore_target", "use_badam", "badam_switch_mode",
    "badam_switch_interval", "quantization_bit", "freeze_vision_tower", "freeze_multi_modal_projector",
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "bf16", "fp16",
    "pure_bf16", "gradient_checkpointing", "disable_gradient_checkpointing", "flash_attn", "rope_scaling",
    "shift_attn", "enable_liger_kernel", "use_unsloth", "neftune_alpha", "neftune_noise_alpha", "deepspeed",
    "logging_steps", "save_steps", "eval_steps", "report_to", "use_swanlab", "seed", "resume_from_checkpoint",
    *DPO_KEYS, *PPO_KEYS,
)


class _Keys:
    """The YAML's keys, each marked as it is read: what is never read was not mapped."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.read: set[str] = set()
        self.refused: list[str] = []
        self.notes: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.cfg.get(key)
        return default if value is None else value

    def given(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def refuse(self, key: str, why: str) -> None:
        self.read.add(key)
        self.refused.append(f"{key}: {why}")

    def note(self, key: str, why: str) -> None:
        self.read.add(key)
        self.notes.append(f"{key} left out: {why}")


def translate(path: Path) -> jobs.Job:
    """The job that trains what `llamafactory-cli train PATH` trains; warnings for what it leaves out."""
    raw = read_mapping(path, "LLaMA-Factory file", "check the path given to `lmforge run --from-llamafactory`",
                       "give a LLaMA-Factory training YAML (`key: value` lines)")
    keys = _Keys({str(k).strip(): v for k, v in raw.items()})
    data = _steps(keys, path)
    command = data["steps"][-1]["command"]
    for key, value in keys.cfg.items():
        if key in keys.read or value is None:
            continue
        if key in SAME:
            if SAME[key](value):
                continue
        elif value in (False, 0, "", []) and (key in REFUSED or key in IGNORED):   # off: nothing to leave out
            continue
        if key in REFUSED:
            keys.refuse(key, f"{value!r}: {REFUSED[key]}")
        elif key in IGNORED:
            keys.note(key, IGNORED[key])
        elif key in DPO_KEYS:
            keys.note(key, "applies to stage dpo and kto")
        elif key in PPO_KEYS:
            keys.note(key, "applies to stage ppo")
        elif key in MAPPED:
            keys.note(key, f"{command} has no such setting")
        else:
            keys.note(key, "not a key lmforge knows")
    if keys.refused:
        raise BadInput(f"{path}: LLaMA-Factory keys that lmforge cannot honour: {'; '.join(keys.refused)}",
                       "remove them to train without them, or write the job by hand (docs/guides/job-files.md)")
    for note in keys.notes:
        log.warn(f"{path}: {note}")
    return jobs.make(path, data, notes=keys.notes)


def _steps(k: _Keys, path: Path) -> dict[str, Any]:
    stage = str(k.get("stage", "sft"))
    if stage not in STAGES:
        raise BadInput(f"{path}: stage {stage!r}: not one of {', '.join(STAGES)}")
    if k.given("do_train") and k.cfg["do_train"] is not True:
        raise BadInput(f"{path}: do_train is {k.cfg['do_train']!r}: lmforge run translates training configs",
                       "evaluate with `lmforge eval ...`, predict with `lmforge eval generate`")
    model = k.get("model_name_or_path")
    output = str(k.get("output_dir", "")).rstrip("/")
    if not model or not output:
        missing = "model_name_or_path" if not model else "output_dir"
        raise BadInput(f"{path}: no {missing}", f"give {missing}, as llamafactory-cli train needs it")
    work = f"{output}.data"   # the data between the steps, beside the run (a run's directory holds the run only)
    steps: list[dict[str, Any]] = []
    train_data = _data(k, path, stage, "dataset", work, "train", steps)
    eval_data = _data(k, path, stage, "eval_dataset", work, "eval", steps) if k.given("eval_dataset") else None
    if k.given("val_size") and float(k.get("val_size")) > 0:
        if eval_data:
            k.note("val_size", "eval_dataset is the held-out data")
        else:
            split = f"{work}/split"
            steps.append({"name": "split", "command": "data split", "options": {
                "input": train_data, "output": split, "val_size": k.get("val_size"), "seed": k.get("seed", 42)}})
            train_data, eval_data = f"{split}/train.arrow", f"{split}/val.arrow"
    pack = _pack(k, stage, str(model))
    steps.append({"name": "pack", "command": "data pack", "options": {
        "input": train_data, "output": f"{work}/train.packed", **pack}})
    train = {"model": str(model), "data": f"{work}/train.packed", "output": output}
    if eval_data:
        steps.append({"name": "pack eval", "command": "data pack", "options": {
            "input": eval_data, "output": f"{work}/eval.packed", **pack}})
        train["eval_data"] = f"{work}/eval.packed"
    command = STAGES[stage]
    train.update(_training(k, path, stage))
    steps.append({"name": "train", "command": command, "options": train})
    return {"steps": steps}


def _data(k: _Keys, path: Path, stage: str, key: str, work: str, part: str, steps: list) -> str:
    """Align the entries `key` names (merged as mix_strategy says); returns the aligned file."""
    names = [n.strip() for n in str(k.get(key, "")).split(",") if n.strip()]
    if not names:
        raise BadInput(f"{path}: no {key}", "name the dataset_info.json entries to train on (dataset: a,b)")
    directory = str(k.get("dataset_dir", "data"))
    if directory == "ONLINE":
        raise BadInput(f"{path}: dataset_dir ONLINE (datasets by Hub name)",
                       "give a dataset_dir with a dataset_info.json")
    info = Path(directory) / "dataset_info.json"
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: dataset_dir {directory}: cannot read {info} ({exc})",
                       "give dataset_dir, the directory of the datasets' dataset_info.json") from None
    for name in names:
        if name not in entries:
            raise BadInput(f"{path}: {key}: {info} has no entry '{name}'", close_names(name, list(entries)))
    common: dict[str, Any] = {"dataset_info": str(info)}
    if k.given("max_samples"):
        common["max_samples"] = k.get("max_samples")
    mix = str(k.get("mix_strategy", "concat"))
    if mix == "concat" or len(names) == 1:
        if k.given("interleave_probs"):
            k.note("interleave_probs", "mix_strategy is concat")
        steps.append({"name": f"align {part}", "command": "data align",
                      "options": {**common, "name": names, "output": f"{work}/{part}.arrow"}})
        return f"{work}/{part}.arrow"
    if mix not in ("interleave_under", "interleave_over"):
        raise BadInput(f"{path}: mix_strategy {mix!r}: not one of concat, interleave_under, interleave_over")
    for name in names:
        steps.append({"name": f"align {part} {name}", "command": "data align",
                      "options": {**common, "name": [name], "output": f"{work}/{part}-{name}.arrow"}})
    merge: dict[str, Any] = {"inputs": [f"{work}/{part}-{n}.arrow" for n in names], "output": f"{work}/{part}.arrow",
                             "mix": mix.replace("_", "-"), "seed": k.get("seed", 42)}
    if k.given("interleave_probs"):
        merge["probs"] = str(k.get("interleave_probs")).replace(" ", "")
    steps.append({"name": f"merge {part}", "command": "data merge", "options": merge})
    return f"{work}/{part}.arrow"


def _pack(k: _Keys, stage: str, model: str) -> dict[str, Any]:
    pack: dict[str, Any] = {"model": model, "stage": stage, "cutoff": k.get("cutoff_len", DEFAULTS["cutoff_len"])}
    if stage == "pt":
        for key in ("template", "enable_thinking", "train_on_prompt", "mask_history"):
            if k.given(key):
                k.note(key, "pre-training data has no chat turns")
        if k.given("packing") and k.get("packing") is False:
            k.note("packing", "lmforge packs pre-training text always (concatenated rows)")
    else:
        pack["template"] = template(k)
        if k.given("enable_thinking"):
            pack["thinking"] = "on" if k.get("enable_thinking") else "off"
        for key in ("train_on_prompt", "mask_history"):
            if k.get(key):
                pack[key] = True
        if k.get("packing"):
            pack["packing"] = True
    if k.get("neat_packing"):
        pack["neat_packing"] = True
    if k.given("preprocessing_num_workers"):
        pack["num_proc"] = k.get("preprocessing_num_workers")
    for key in ("image_max_pixels", "image_min_pixels"):
        if k.given(key):
            pack[key] = k.get(key)
    return pack


def template(k: _Keys) -> str:
    """LLaMA-Factory's template name as lmforge's (`lmforge data templates`)."""
    name = k.get("template")
    if name is None:
        return "auto"
    name = str(name)
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name in TEMPLATE_SAME:
        return name
    if name == "empty":
        k.refuse("template", "'empty' (no chat format): give one of `lmforge data templates`, or auto")
        return "auto"
    k.notes.append(f"template {name!r} left out: lmforge has no template of that name; using auto (the model's "
                   "own chat template)")
    return "auto"


def _training(k: _Keys, path: Path, stage: str) -> dict[str, Any]:
    """The train step's options."""
    out: dict[str, Any] = {}
    kind = str(k.get("finetuning_type", "lora"))
    if kind == "oft":
        k.refuse("finetuning_type", "'oft': OFT is not an lmforge method")
    elif kind not in ("lora", "freeze", "full"):
        raise BadInput(f"{path}: finetuning_type {kind!r}: not one of lora, freeze, full")
    method = kind
    if kind == "lora":
        method = "dora" if k.get("use_dora") else "pissa" if k.get("pissa_init") else "lora"
    elif kind == "full":
        method = "galore" if k.get("use_galore") else "badam" if k.get("use_badam") else "full"
    for key in ("use_dora", "pissa_init", "use_galore", "use_badam"):
        if k.get(key) and method not in ("dora", "pissa", "galore", "badam"):
            k.note(key, f"applies to another finetuning_type than {kind}")
    groups = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "loraplus_lr_ratio"),
              "freeze": ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
              "galore": ("galore_rank", "galore_scale", "galore_update_interval", "galore_target"),
              "badam": ("badam_switch_mode", "badam_switch_interval")}
    family = "lora" if method in ("lora", "dora", "pissa") else method
    for group, names in groups.items():
        if group != family:
            for key in names:
                if k.given(key):
                    k.note(key, f"applies to {group}, not finetuning_type {kind}")
    if stage == "ppo":
        return _ppo(k, path, method)
    out["method"] = method
    if family == "lora":
        _copy(k, out, lora_rank="lora_rank", lora_alpha="lora_alpha", lora_dropout="lora_dropout",
              lora_target="lora_target", rslora="use_rslora", loraplus_ratio="loraplus_lr_ratio")
    elif family == "freeze":
        _copy(k, out, freeze_layers="freeze_trainable_layers", freeze_modules="freeze_trainable_modules",
              freeze_extra="freeze_extra_modules")
    elif family == "galore":
        out["galore_scale"] = k.get("galore_scale", 2.0)   # LLaMA-Factory's default scale
        _copy(k, out, galore_rank="galore_rank", galore_update_interval="galore_update_interval",
              galore_target="galore_target")
    elif family == "badam":
        mode = k.get("badam_switch_mode", "ascending")
        if mode == "fixed":
            k.refuse("badam_switch_mode", "'fixed': lmforge's BAdam switches blocks")
        else:
            out["badam_mode"] = mode
        _copy(k, out, badam_switch_interval="badam_switch_interval")
    if k.given("quantization_bit"):
        bits = k.get("quantization_bit")
        if bits not in (4, 8):
            k.refuse("quantization_bit", f"{bits}: lmforge loads the base in 4 or 8 bits")
        else:
            out["quant"] = bits
    _optimisation(k, out)
    if k.get("shift_attn"):
        out["shift_attn"] = True
    if k.get("enable_liger_kernel"):
        out["kernels"] = "liger"
    if k.get("use_unsloth"):
        out["kernels"] = "unsloth"
    if k.given("disable_gradient_checkpointing") or k.given("gradient_checkpointing"):
        out["gradient_checkpointing"] = bool(k.get("gradient_checkpointing", True)) and \
            not k.get("disable_gradient_checkpointing", False)
    else:
        out["gradient_checkpointing"] = True   # LLaMA-Factory checkpoints unless told not to
    alpha = k.get("neftune_noise_alpha", k.get("neftune_alpha"))
    if alpha:
        if stage in ("pt", "sft"):
            out["neftune_alpha"] = alpha
        else:
            k.note("neftune_noise_alpha" if k.given("neftune_noise_alpha") else "neftune_alpha",
                   "lmforge's NEFTune is for pt and sft")
    if k.given("freeze_vision_tower"):
        out["train_vision_tower"] = not k.get("freeze_vision_tower")
    if k.given("freeze_multi_modal_projector"):
        out["train_projector"] = not k.get("freeze_multi_modal_projector")
    if k.given("eval_steps"):
        if k.given("val_size") or k.given("eval_dataset"):
            out["eval_steps"] = k.get("eval_steps")
        else:
            k.note("eval_steps", "no held-out data (val_size or eval_dataset)")
    deepspeed = k.get("deepspeed")
    if deepspeed:
        out["deepspeed"] = _deepspeed(k, str(deepspeed))
    if stage in ("dpo", "kto"):
        out["loss"] = "kto" if stage == "kto" else str(k.get("pref_loss", "sigmoid"))
        if out["loss"] == "kto_pair":
            k.refuse("pref_loss", "'kto_pair': use stage kto on KTO-labelled data")
        _copy(k, out, beta="pref_beta", ftx="pref_ftx", simpo_gamma="simpo_gamma",
              desirable_weight="kto_chosen_weight", undesirable_weight="kto_rejected_weight")
    return out


def _optimisation(k: _Keys, out: dict[str, Any]) -> None:
    """What every stage shares: optimiser, schedule, steps, precision, the run."""
    out["learning_rate"] = k.get("learning_rate", DEFAULTS["learning_rate"])
    out["batch_size"] = k.get("per_device_train_batch_size", DEFAULTS["per_device_train_batch_size"])
    out["grad_accum"] = k.get("gradient_accumulation_steps", DEFAULTS["gradient_accumulation_steps"])
    out["scheduler"] = k.get("lr_scheduler_type", DEFAULTS["lr_scheduler_type"])
    _copy(k, out, epochs="num_train_epochs", weight_decay="weight_decay", max_grad_norm="max_grad_norm",
          logging_steps="logging_steps", save_steps="save_steps", seed="seed")
    if int(k.get("max_steps", -1)) > 0:
        out["max_steps"] = k.get("max_steps")
    if k.get("warmup_steps"):
        out["warmup"] = k.get("warmup_steps")
        if k.get("warmup_ratio"):
            k.note("warmup_ratio", "warmup_steps is given (transformers uses it first)")
    elif k.get("warmup_ratio"):
        out["warmup"] = k.get("warmup_ratio")
    if k.given("optim"):
        out["optim"] = OPTIMIZERS.get(str(k.get("optim")), str(k.get("optim")))
    if k.get("bf16") or k.get("pure_bf16"):
        out["precision"] = "bf16"
        if k.get("pure_bf16"):
            k.notes.append("pure_bf16 read as bf16: lmforge keeps fp32 master weights when it trains all weights")
    elif k.get("fp16"):
        out["precision"] = "fp16"
    attention = k.get("flash_attn")
    if attention is not None:
        if str(attention) in ATTENTION:
            out["attn"] = ATTENTION[str(attention)]
        else:
            k.note("flash_attn", f"{attention!r} is not an lmforge attention kernel; auto picks one")
    if k.given("rope_scaling"):
        scaling = str(k.get("rope_scaling"))
        if scaling in ("linear", "dynamic", "yarn"):
            out["rope_scaling"] = scaling
        else:
            k.refuse("rope_scaling", f"{scaling!r}: lmforge scales RoPE linear, dynamic or yarn")
    _run(k, out)


def _run(k: _Keys, out: dict[str, Any]) -> None:
    """Trackers and resuming (every stage, PPO's own loop included)."""
    reports = k.get("report_to")
    if reports is not None:
        names = [reports] if isinstance(reports, str) else list(reports)
        if k.get("use_swanlab"):
            names.append("swanlab")
        chosen = [str(n) for n in names if str(n) not in ("none", "all")]
        if "all" in names:
            k.note("report_to", "'all': name the trackers (tensorboard, wandb, mlflow, trackio, swanlab)")
        if chosen:
            out["report"] = chosen
    elif k.get("use_swanlab"):
        out["report"] = ["swanlab"]
    resume = k.get("resume_from_checkpoint")
    if resume:
        if resume is True or str(resume).startswith(str(k.cfg.get("output_dir", "")).rstrip("/") + "/"):
            out["resume"] = True
        else:
            k.refuse("resume_from_checkpoint", f"{resume!r}: lmforge resumes from the last checkpoint in output_dir")


def _ppo(k: _Keys, path: Path, method: str) -> dict[str, Any]:
    """train ppo: LoRA on the policy, the reward model a directory; LLaMA-Factory's PPO batch is
    the rollouts of one optimisation step (per device batch x accumulation)."""
    if method != "lora":
        k.refuse("finetuning_type", f"{method}: lmforge's PPO trains a LoRA adapter")
    reward = k.get("reward_model")
    if not reward:
        raise BadInput(f"{path}: stage ppo needs reward_model", "train one first (stage rm, or `lmforge train rm`)")
    if k.get("reward_model_type", "lora") == "api":
        k.refuse("reward_model_type", "'api': the reward model is a directory (`lmforge train rm`)")
    out: dict[str, Any] = {"reward": str(reward)}
    _copy(k, out, lora_rank="lora_rank", lora_alpha="lora_alpha", lora_target="lora_target",
          ppo_epochs="ppo_epochs", kl_target="ppo_target", max_new_tokens="max_new_tokens", top_k="top_k",
          top_p="top_p", temperature="temperature", max_grad_norm="max_grad_norm", seed="seed",
          save_steps="save_steps", logging_steps="logging_steps")
    if k.get("ppo_score_norm"):
        out["reward_norm"] = True
    batch = int(k.get("per_device_train_batch_size", DEFAULTS["per_device_train_batch_size"]))
    accum = int(k.get("gradient_accumulation_steps", DEFAULTS["gradient_accumulation_steps"]))
    out.update(learning_rate=k.get("learning_rate", DEFAULTS["learning_rate"]), mini_batch_size=batch,
               batch_size=batch * accum)
    if int(k.get("max_steps", -1)) > 0:
        out["max_steps"] = k.get("max_steps")
    elif k.given("num_train_epochs"):
        out["epochs"] = k.get("num_train_epochs")
    if k.get("bf16"):
        out["precision"] = "bf16"
    elif k.get("fp16"):
        out["precision"] = "fp16"
    _run(k, out)
    if k.given("lora_dropout"):
        k.note("lora_dropout", "lmforge's PPO adapter has no dropout")
    return out


def _deepspeed(k: _Keys, spec: str) -> str:
    """A DeepSpeed config file that exists, or LLaMA-Factory's own stage files as lmforge's names."""
    if Path(spec).exists() or spec in ("z2", "z3", "z3-offload"):
        return spec
    name = Path(spec).name
    if name in DEEPSPEED:
        k.notes.append(f"deepspeed {spec} read as lmforge's {DEEPSPEED[name]} (the file is not here)")
        return DEEPSPEED[name]
    k.refuse("deepspeed", f"{spec!r} not found")
    return spec


def _copy(k: _Keys, out: dict[str, Any], **names: str) -> None:
    """out[option] = the value of each LLaMA-Factory key that is set."""
    for option, key in names.items():
        if k.given(key):
            out[option] = k.get(key)
