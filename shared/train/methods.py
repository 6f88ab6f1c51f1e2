"""Fine-tuning methods: which parameters train, and how.

full        every parameter
freeze      the last N decoder layers (negative N: the first |N|), optionally only some of their
            submodules, plus extra modules by name
lora        PEFT LoRA adapters (rsLoRA scaling and LoRA+ learning rates optional)
dora        weight-decomposed LoRA
pissa       LoRA initialised from the principal singular vectors; saved converted to a plain LoRA
            that applies to the original base model
llama-pro   block expansion: K copies of evenly spaced decoder layers are inserted with their
            output projections zeroed (so the model is unchanged at start); only they train
galore, badam   see optimizers.py (memory-efficient full-parameter training)
"""

from __future__ import annotations

import copy

from lmforge.shared.core import log
from lmforge.shared.core.commands.training import Method
from lmforge.shared.core.errors import BadInput, RunFailure
from lmforge.shared.model import archrules



def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama-like models)."""
    import torch

    from lmforge.shared.data import modalities

    best = None
    media = modalities.of_model(model)
    skip = media.tower_modules(model) if media is not None else []   # a tower's blocks are not the decoder
    for name, module in model.named_modules():
        if skip and any(name.startswith(v + ".") for v in skip):
            continue
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise BadInput(f"cannot find the decoder layers of {type(model).__name__}",
                       "use --method full or lora for this architecture")
    return best


def _names(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def apply(model, o: Method, added_token_ids: list[int] | None = None):
    """Set up `model` for method `o.method`; returns the model to train (PEFT-wrapped for adapters).
    `added_token_ids`: tokens the data's template added, trained beside an adapter."""
    chosen = _apply(model, o, added_token_ids or [])
    from lmforge.shared.data import modalities

    media = modalities.of_model(model)
    if media is not None and not o.is_adapter:   # a vision-language model: its tower and projector frozen by default
        media.freeze(chosen, o.train_projector, o.train_vision_tower)
    if archrules.wants_router_loss(chosen):  # a trainable MoE router: add the load-balancing loss
        base = chosen.get_base_model() if hasattr(chosen, "get_base_model") else chosen
        base.config.output_router_logits = True
        log.info(f"{base.config.model_type}: router trains; load-balancing loss on "
                 f"(x{base.config.router_aux_loss_coef:g})")
    return chosen


def _apply(model, o: Method, added_token_ids: list[int]):
    if o.is_adapter:
        return _lora(model, o, added_token_ids)
    if o.method in ("full", "galore", "badam"):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if o.method == "freeze":
        return _freeze(model, o)
    if o.method == "llama-pro":
        return _expand(model, o)
    raise BadInput(f"unknown method '{o.method}'")


def _lora(model, o: Method, added_token_ids: list[int]):
    from peft import LoraConfig, get_peft_model

    from lmforge.shared.data import modalities

    quantized = _quantized_linears(model)
    excluded = archrules.not_linear(model)
    if o.lora_target == "all":
        target: str | list[str] = quantized or "all-linear"
    else:
        target = _names(o.lora_target)
        present = {n.split(".")[-1] for n, _ in model.named_modules()}
        unknown = [t for t in target if t not in present]
        if unknown:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise BadInput(f"--lora-target: {', '.join(unknown)} not in the model", f"its linear layers: {', '.join(linear)}")
        named = sorted({n.split(".")[-1] for n in excluded} & set(target))
        if named:
            kind = type(model.get_submodule(next(n for n in excluded if n.split(".")[-1] == named[0]))).__name__
            raise BadInput(f"--lora-target {named[0]}: {kind} is a linear layer whose forward returns more than "
                           "its product, which LoRA cannot adapt", "leave it out of --lora-target")
    media = modalities.of_model(model)
    if media is not None:   # adapters on the language model only (its linear layers, by full name)
        names = set(target) if isinstance(target, list) else None   # given names, or a quantized model's
        target = [n for n in media.language_linears(model, linear_layers(model))
                  if names is None or n.split(".")[-1] in names]
    # PEFT's annotations are narrower than what it accepts: lora_alpha is declared int (a float
    # works: the scale is alpha / rank), and its Literal cannot spell "pissa_niter_<n>"
    config = LoraConfig(
        task_type="CAUSAL_LM", r=o.lora_rank, lora_alpha=o.lora_alpha or 2 * o.lora_rank,  # type: ignore[arg-type]
        lora_dropout=o.lora_dropout, target_modules=target, use_dora=o.method == "dora",
        use_rslora=o.rslora, init_lora_weights="pissa_niter_16" if o.method == "pissa" else True,  # type: ignore[arg-type]
        trainable_token_indices=added_token_ids or None, exclude_modules=excluded or None,
        modules_to_save=(media.modules_to_save(model, o.train_projector, o.train_vision_tower) or None)
        if media is not None else None)
    linears = linear_layers(model)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        if o.method != "dora" or "dora" not in str(exc).lower():
            raise
        kind = getattr(model.config, "model_type", type(model).__name__)
        fused = archrules.fused_expert_modules(model)
        raise BadInput(f"--method dora: {kind} keeps its experts as fused tensors"
                       + (f" ({fused[0]})" if fused else "") + ", which PEFT's DoRA cannot adapt",
                       "use --method lora, or --method dora with --lora-target naming linear layers "
                       "(e.g. q_proj,v_proj)") from None
    if target == "all-linear":
        # PEFT's "all-linear" matches by last name and, on MoE models, trades names such as down_proj
        # for the fused experts' tensors, leaving dense MLPs and shared experts out: those are then
        # adapted through their weights (target_parameters), and the coverage checked
        missing = sorted(set(linears) - adapted_modules(wrapped))
        if missing:
            config.target_parameters = sorted(set(config.target_parameters or []) | {f"{n}.weight" for n in missing})
            wrapped = get_peft_model(wrapped.unload(), config)
            missing = sorted(set(linears) - adapted_modules(wrapped))
        if missing:
            raise RunFailure(f"--lora-target all left {len(missing)} linear layer(s) without an adapter "
                             f"({', '.join(missing[:4])})", "name the layers with --lora-target")
    from lmforge.shared.train.patches import lorafused

    lorafused.install(wrapped)   # the adapter products in the base's precision (mixed precision)
    return wrapped


def linear_layers(model) -> list[str]:
    """Full names of every linear layer (torch Linear, GPT-2's Conv1D) but the output head."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    not_linear = set(archrules.not_linear(model))
    return [n for n, m in model.named_modules()
            if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
            and "value_head" not in n and n not in not_linear]


def adapted_modules(wrapped) -> set[str]:
    """Names (relative to the base model) of the modules that carry a LoRA adapter."""
    prefix = "base_model.model."
    return {n[len(prefix):] if n.startswith(prefix) else n for n, m in wrapped.named_modules()
            if hasattr(m, "lora_A") and not n.endswith(".base_layer")}


def _quantized_linears(model) -> list[str]:
    """Names of GPTQ/AWQ layers (PEFT's "all-linear" only recognises torch Linear layers)."""
    names = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "qweight")}
    return sorted(names)


def _freeze(model, o: Method):
    name, layers = decoder_layers(model)
    n = len(layers)
    if abs(o.freeze_layers) > n:
        raise BadInput(f"--freeze-layers {o.freeze_layers}: the model has {n} layers")
    chosen = range(n - o.freeze_layers, n) if o.freeze_layers > 0 else range(0, -o.freeze_layers)
    modules = _names(o.freeze_modules)
    extra = _names(o.freeze_extra)
    for p in model.parameters():
        p.requires_grad_(False)
    found = False
    for i in chosen:
        for pname, p in layers[i].named_parameters():
            if "all" in modules or any(m in pname.split(".") for m in modules):
                p.requires_grad_(True)
                found = True
    if not found:
        sub = sorted({k.split(".")[0] for k, _ in layers[0].named_parameters()})
        raise BadInput(f"--freeze-modules {o.freeze_modules}: no such submodule in the layers",
                       f"the layers hold {', '.join(sub)}")
    for pname, p in model.named_parameters():
        if any(e in pname.split(".") for e in extra):
            p.requires_grad_(True)
    if extra and not any(any(e in pname.split(".") for e in extra) for pname, _ in model.named_parameters()):
        raise BadInput(f"--freeze-extra {o.freeze_extra}: no such module in the model")
    _upcast_trainable(model)
    return model


def _expand(model, o: Method):
    """LLaMA-Pro: insert o.expand_layers identity-initialised copies of evenly spaced layers.

    A copy starts as the identity because what it adds to the residual stream is zero: its output
    projections (of attention, of the MLP or the experts) are zeroed. They are found by what the
    block computes, not by name (see _output_projections), and the result is checked: the
    expanded model's logits must equal the original's on a batch, or the run does not start."""
    import torch

    name, layers = decoder_layers(model)
    n, k = len(layers), o.expand_layers
    if n % k:
        raise BadInput(f"--expand-layers {k} must divide the model's {n} layers")
    every = n // k
    probe = _probe_batch(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(probe).logits.float()
    kind = getattr(model.config, "model_type", type(model).__name__)
    expanded, new, source = [], [], []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        source.append(i)
        if (i + 1) % every == 0:
            zero = _output_projections(model, layer, probe)
            if not zero:
                raise BadInput(f"--method llama-pro: cannot find the output projections of {kind}'s "
                               f"{type(layer).__name__}", "use --method freeze or lora for this architecture")
            twin = copy.deepcopy(layer)
            params = dict(twin.named_parameters())
            with torch.no_grad():
                for pname in zero:
                    params[pname].zero_()
            expanded.append(twin)
            source.append(i)
            new.append(len(expanded) - 1)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList(expanded))
    for index, layer in enumerate(expanded):  # KV-cache slots follow the new order
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    _expand_config(model.config, n, source)
    with torch.no_grad():
        after = model(probe).logits.float()
    model.train(was_training)
    gap = (after - before).abs().max().item()
    if not gap <= 1e-4 * max(1.0, before.abs().max().item()):
        raise BadInput(f"--method llama-pro: the expanded {kind} model is not the original "
                       f"(logits differ by {gap:.3g} on a test batch)", "use --method freeze or lora for this architecture")
    _check_reloadable(model, kind)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in new:
        for p in expanded[i].parameters():
            p.requires_grad_(True)
    log.info(f"llama-pro: {n} -> {len(expanded)} layers; training the {k} new block(s) {new}")
    _upcast_trainable(model)
    return model


def _probe_batch(model):
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (2, 16), generator=generator).to(device)


def _output_projections(model, layer, probe) -> list[str]:
    """Parameter names (in `layer`) of what writes the block's branches into the residual stream.

    Traced on a forward pass: a linear map (torch Linear, GPT-2's Conv1D) whose output has the
    hidden size and whose input is not read from the residual stream (the block's input or a norm
    of it) is an output projection (o_proj, dense, c_proj, down_proj, fc2, w2, ...); fused experts
    (3-D tensors) contribute their down projections."""
    import torch

    hidden = model.get_input_embeddings().weight.shape[1]
    readers: list = []     # tensors read from the residual stream (kept alive: their addresses stay theirs)
    calls: list[tuple[str, object]] = []
    hooks = []

    def grab_input(_module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(x):
            readers.append(x)

    hooks.append(layer.register_forward_pre_hook(grab_input, with_kwargs=True))
    for mname, module in layer.named_modules():
        if "Norm" in type(module).__name__:
            hooks.append(module.register_forward_hook(lambda _m, _a, out: readers.append(out)))
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            hooks.append(module.register_forward_hook(
                lambda _m, args, _out, mname=mname: calls.append((mname, args[0]))))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    ptrs = {t.data_ptr() for t in readers if torch.is_tensor(t)}
    zero = []
    modules = dict(layer.named_modules())
    for mname, x in dict(calls).items():
        module = modules[mname]
        width = module.nf if type(module).__name__ == "Conv1D" else module.out_features
        if width == hidden and torch.is_tensor(x) and x.data_ptr() not in ptrs:
            zero += [f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False)]
    for mname, module in layer.named_modules():  # fused experts: [experts, out, in] tensors
        fused = [p for p, t in module.named_parameters(recurse=False) if t.ndim == 3]
        if fused:
            down = [p for p, _ in module.named_parameters(recurse=False) if p.startswith("down")]
            zero += [f"{mname}.{p}" if mname else p for p in down]
    return zero


def _expand_config(config, n: int, source: list[int]) -> None:
    """Per-layer config entries follow the new layer order (source[i]: the original of layer i)."""
    from lmforge.shared.model import archrules

    for key in archrules.LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, key, [values[i] for i in source])
    for key in archrules.LAYER_INDICES:
        values = getattr(config, key, None)
        if values:
            setattr(config, key, [j for j, i in enumerate(source) if i in set(values)])
    dense = getattr(config, "first_k_dense_replace", None)
    if isinstance(dense, int) and dense > 0:
        config.first_k_dense_replace = sum(1 for i in source if i < dense)
    config.num_hidden_layers = len(source)


def _check_reloadable(model, kind: str) -> None:
    """The saved config must rebuild the expanded model: same tensors, same shapes."""
    import torch

    try:
        with torch.device("meta"):
            rebuilt = type(model)(copy.deepcopy(model.config))
    except Exception as exc:  # noqa: BLE001 - any failure means the checkpoint would not load
        raise BadInput(f"--method llama-pro: the expanded {kind} config does not build a model "
                       f"({str(exc).splitlines()[0][:200]})", "use --method freeze or lora for this architecture") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:2]
        raise BadInput(f"--method llama-pro: a checkpoint of the expanded {kind} model would not load "
                       f"(layers the config does not describe: {diff})", "use --method freeze or lora for this architecture")


def _upcast_trainable(model) -> None:
    """Trainable parameters in fp32 when the model was loaded in half precision (stable updates)."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
