"""`lmforge adapter merge`: fold adapters into their base model."""

from __future__ import annotations

from ._cli import command, declared, group, print_path

app = group("Work with PEFT adapters (LoRA, DoRA, PiSSA) made by `lmforge train`.")


@command(app, "merge")
@declared("adapter merge")
def merge(o) -> None:
    """Merge adapters into the base model: a plain Hugging Face model directory."""
    from lmforge.shared.core import log
    from lmforge.shared.model import merging

    log.quiet_libraries()
    with log.stdout_guard():
        out = merging.merge(o)
    print_path(out)
