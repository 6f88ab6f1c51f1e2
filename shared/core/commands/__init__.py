"""Every command's options, declared once as a typed class (see lmforge.shared.core.options).

    common.py    options many commands take (the model, the output, sampling, ...)
    data.py      data align | merge | split | show | pack | stats | templates
    model.py     model quantize | init | export, adapter merge
    training.py  the parts every training stage is composed of (method, LoRA, optimisation, run, ...)
    train.py     train pt | sft | rm | dpo | ppo | grpo
    infer.py     eval ..., serve, chat, board, completion
    run.py       run (job files)

catalog.py maps each command name to its class.
"""
