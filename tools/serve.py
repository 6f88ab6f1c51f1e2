"""`lmforge serve` (an OpenAI-compatible API) and `lmforge chat` (a terminal conversation)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer

MODEL = "Model"


def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory or Hub id.", rich_help_panel=MODEL)],
    adapter: Annotated[Optional[str], typer.Option(help="A PEFT adapter to serve on the model.", rich_help_panel=MODEL)] = None,
    template: Annotated[str, typer.Option(
        help="auto (what the model was trained with, else its chat template) or a template name.",
        rich_help_panel=MODEL)] = "auto",
    name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: the directory name).",
                                                rich_help_panel=MODEL)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require 'Authorization: Bearer KEY' (also LMFORGE_API_KEY).", envvar="LMFORGE_API_KEY")] = None,
    backend: Annotated[Literal["hf", "vllm"], typer.Option(help="hf: transformers (CPU or GPU); vllm: vLLM (GPU).")] = "hf",
    max_concurrency: Annotated[int, typer.Option(help="Requests generated at once; more wait their turn.", min=1)] = 32,
    max_batch: Annotated[int, typer.Option(help="hf backend: most sequences in one generation batch.", min=1)] = 32,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tools)."""
    from lmforge.shared.core import log
    from lmforge.shared.infer import serving

    serving.check_port(host, port)
    log.quiet_libraries()
    with log.stdout_guard():
        served = serving.prepare(model, adapter, template, backend, max_concurrency, max_batch, api_key, name)
    import uvicorn

    log.info(f"serve: {served.name} ({served.renderer.name} template, {backend} backend) at http://{host}:{port}/v1"
             + (" (API key required)" if api_key else ""))
    uvicorn.run(serving.create_app(served), host=host, port=port, log_level="warning" if not log.debug() else "info",
                access_log=log.debug())


def chat(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory or Hub id.")],
    adapter: Annotated[Optional[str], typer.Option(help="A PEFT adapter to use.")] = None,
    template: Annotated[str, typer.Option(help="auto or a template name.")] = "auto",
    system: Annotated[str, typer.Option(help="A system prompt.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Longest answer.", min=1)] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).", min=0)] = 0.7,
) -> None:
    """Talk to a model in the terminal: answers stream as they are written; /reset, /exit."""
    import sys

    from lmforge.shared.core import log
    from lmforge.shared.infer import serving

    log.quiet_libraries()
    with log.stdout_guard():
        served = serving.prepare(model, adapter, template, "hf", 1, 1, None, None)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {served.name} ({served.renderer.name} template); /reset starts over, /exit ends.",
              file=sys.stderr)

    def read():
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        return line if line else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    serving.chat_loop(served, system, max_tokens, temperature, read, write)
