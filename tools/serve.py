"""`lmforge serve` (an OpenAI-compatible API) and `lmforge chat` (a terminal conversation)."""

from __future__ import annotations


from ._cli import declared, serve_until_stopped


@declared("serve")
def serve(o) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tools)."""
    model, adapter, template, name, host, port, api_key, backend = (o.model, o.adapter, o.template, o.name, o.host,
                                                                     o.port, o.api_key, o.backend)
    max_concurrency, max_batch, attn, max_request_bytes, media_dir = (o.max_concurrency, o.max_batch, o.attn,
                                                                       o.max_request_bytes, o.media_dir)
    max_images, max_image_bytes, max_image_pixels = o.max_images, o.max_image_bytes, o.max_image_pixels
    from lmforge.shared.core import log
    from lmforge.shared.infer import app
    from lmforge.shared.model.models import prefer_attention

    prefer_attention(attn)

    app.check_port(host, port)
    media = app.media_dir_of(media_dir)   # checked before the model loads
    log.quiet_libraries()
    with log.stdout_guard():
        served = app.prepare(model, adapter, template, backend, max_concurrency, max_batch, api_key, name,
                             max_images=max_images)
    served.max_request_bytes = max_request_bytes
    served.media_dir = media
    app.limit_images(served, max_image_bytes, max_image_pixels)

    log.info(f"serve: {served.name} ({served.renderer.name} template, {backend} backend) at http://{host}:{port}/v1"
             + (" (API key required)" if api_key else ""))
    serve_until_stopped("serve", app.create_app(served), host, port)


@declared("chat")
def chat(o) -> None:
    """Talk to a model in the terminal: answers stream as they are written; /help lists the commands."""
    import sys

    from lmforge.shared.core import log
    from lmforge.shared.infer.chat import LocalModel, Settings, Terminal, chat_loop
    from lmforge.shared.infer.chat_remote import RemoteModel

    settings = Settings(max_tokens=o.max_tokens, temperature=o.temperature, repetition_penalty=o.repetition_penalty,
                        frequency_penalty=o.frequency_penalty, presence_penalty=o.presence_penalty)
    model: LocalModel | RemoteModel
    if o.url is not None:
        model = RemoteModel(o.url, o.model, o.api_key)
        if "max_tokens" not in o.chosen:
            settings.max_tokens = None   # the server's own limit (what fits its model's context)
        described = f"{model.name} at {model.base}"
    else:
        from lmforge.shared.infer.app import prepare
        from lmforge.shared.model.models import prefer_attention

        prefer_attention(o.attn)
        log.quiet_libraries()
        with log.stdout_guard():
            served = prepare(o.model, o.adapter, o.template, "hf", 1, 1, None, None)
        model = LocalModel(served)
        described = f"{served.name} ({served.renderer.name} template)"
    terminal = Terminal(sys.stdin, sys.stdout, sys.stderr)
    if terminal.interactive:
        print(f"chat with {described}; /help lists the commands, Ctrl-C stops an answer, Ctrl-D leaves.",
              file=sys.stderr)
    try:
        chat_loop(model, o.system, settings, terminal.read, terminal.write)
    finally:
        terminal.close()
        model.close()
