"""Optimizers: the names transformers offers, 8-bit AdamW, GaLore and BAdam.

- `--optim NAME`: any of transformers' optimizer names, plus short aliases (adamw8bit ->
  bitsandbytes' 8-bit AdamW, paged_adamw8bit, adamw, adafactor, sgd, ...).
- GaLore (`--method galore`): full-parameter training whose optimizer states live in a low-rank
  projection of each targeted weight's gradient (rank, scale, how often the projection is
  recomputed); transformers' galore_adamw* optimizers, from galore-torch.
- BAdam (`--method badam`): block coordinate descent; one decoder layer trains at a time and
  the active block switches every N steps (ascending, descending or random order), so optimizer
  states exist for one block only; from the badam package.
"""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput

ALIASES = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "adamw_8bit": "adamw_bnb_8bit",
           "paged_adamw8bit": "paged_adamw_8bit", "adam8bit": "adamw_bnb_8bit", "lion8bit": "lion_8bit"}


def optimizer_name(name: str, method: str) -> str:
    from transformers.training_args import OptimizerNames

    resolved = ALIASES.get(name, name)
    known = {o.value for o in OptimizerNames}
    if resolved not in known:
        from lmforge.shared.core.errors import close_names

        raise BadInput(f"unknown optimizer '{name}'", close_names(name, sorted(known | set(ALIASES))))
    if "bnb" in resolved or "8bit" in resolved:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BadInput(f"--optim {name} needs bitsandbytes", "pip install 'lmforge[quant]'") from None
    if method == "galore":
        if resolved.startswith("galore"):
            return resolved
        return {"adamw_torch": "galore_adamw", "adamw_bnb_8bit": "galore_adamw_8bit",
                "adafactor": "galore_adafactor"}.get(resolved) or _refuse(name)
    if resolved.startswith("galore"):
        raise BadInput(f"--optim {name} is GaLore's", "use --method galore")
    return resolved


def _refuse(name: str) -> str:
    raise BadInput(f"--method galore works with --optim adamw, adamw8bit or adafactor, not {name}")


def galore_arguments(o) -> dict:
    """TrainingArguments settings for GaLore."""
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        raise BadInput("--method galore needs galore-torch", "pip install 'lmforge[galore]'") from None
    m = o
    targets = [r".*(attn|attention|mlp).*"] if m.galore_target == "all" else \
        [t.strip() for t in m.galore_target.split(",") if t.strip()]
    return {"optim": optimizer_name(o.optim, "galore"), "optim_target_modules": targets,
            "optim_args": f"rank={m.galore_rank}, update_proj_gap={m.galore_update_interval}, "
                          f"scale={m.galore_scale}"}


def custom_optimizer(o, model):
    """An optimizer the Trainer cannot build by name (BAdam), or None."""
    if o.method != "badam":
        return None
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise BadInput("--method badam needs badam", "pip install 'lmforge[badam]'") from None
    import torch
    from lmforge.shared.train.methods import decoder_layers

    name, layers = decoder_layers(model)
    prefixes = [[f"{name}.{i}."] for i in range(len(layers))]
    base = torch.optim.AdamW(model.parameters(), lr=o.lr(), weight_decay=o.weight_decay)
    return BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                          block_prefix_list=prefixes, switch_block_every=o.badam_switch_interval,
                          switch_mode=o.badam_mode, verbose=0)
