"""lmforge as a Python library: every command's use case, called with the command's options.

    from lmforge.shared import api

    api.data.align(inputs=["alpaca.json"], output="aligned.arrow")
    api.data.pack(model="HuggingFaceTB/SmolLM2-135M-Instruct", input="aligned.arrow", output="sft.arrow")
    out = api.train.sft(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="sft.arrow", output="runs/sft")
    report = api.eval.perplexity(model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter=out, data="sft.arrow")

Each function takes the options of its command as keyword arguments, spelled as the options'
names (`learning_rate`, `lora_rank`, ...; `lmforge COMMAND --help` lists them), or one options
object (`TrainSFT(...)`, from lmforge.shared.core.commands). The values are checked as the command
line checks them; bad input raises lmforge's BadInput (its message is the command's error line),
a failure at run time RunFailure. Data-making functions return the path they wrote, training
functions the output directory, evaluations their report as a dict.
"""

from lmforge.shared.api import adapter, data, jobs, model, train
from lmforge.shared.api import evaluate as eval  # noqa: A001 - `api.eval.mmlu(...)` reads as `lmforge eval mmlu`

__all__ = ["adapter", "data", "eval", "jobs", "model", "train"]
