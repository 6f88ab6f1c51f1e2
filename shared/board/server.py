"""The board's web app (FastAPI, as `serve` uses): a JSON API over pipeline/runs/preview, the one
static page, and chat streamed through the same code as `lmforge serve` (infer.app.prepare, the
engine's generate, the template's generation prompt)."""

# no `from __future__ import annotations`: FastAPI resolves the route parameters' annotations at run time

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from lmforge.shared.board import pipeline
from lmforge.shared.board.bodies import ChatBody, Empty, EvalBody, PipelineBody, TooLarge, parse
from lmforge.shared.board.guard import Guard, new_token
from lmforge.shared.board.runs import Runs
from lmforge.shared.board.workspace import Workspace
from lmforge.shared.core.errors import BadInput

PACKAGE = Path(__file__).resolve().parent
STATIC = PACKAGE / "static"
LOCALES = PACKAGE / "locales"
LANGUAGES = ("en", "zh", "ru")

Check = Callable[[list[str]], Optional[str]]   # a command line -> the command's own usage error, or None


class Board:
    """What the app works on: the workspace, its runs, how to check a command line, loaded chat models."""

    def __init__(self, workspace: str | Path, token: str | None = None, check: Check | None = None,
                 host: str = "127.0.0.1", port: int | None = None):
        self.ws = Workspace(workspace)
        self.runs = Runs(self.ws)
        self.token = token or new_token()   # every board has one, loopback included (as Jupyter does)
        self.guard = Guard(self.token, host, port)
        self.check = check
        self.host = host
        self.chat_models: dict[tuple[str, str | None], Any] = {}

    def validated(self, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each step's command line through the command's own option parsing: a bad value gets the
        one line the command would print."""
        if self.check is not None:
            for step in steps:
                problem = self.check(step["argv"][1:])
                if problem:
                    raise pipeline.FieldError(problem, field=pipeline.field_of(step["name"], problem))
        return steps


def create_app(board: Board):
    from fastapi import FastAPI, Request
    from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                                   StreamingResponse)
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="lmforge board", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadInput)
    async def bad_input(request, exc: BadInput):
        field = getattr(exc, "field", None)   # a form field's bad value: the page marks that field
        return JSONResponse({"error": exc.one_line(), **({"field": field} if field else {})},
                            status_code=413 if isinstance(exc, TooLarge) else 400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        first = (str(exc).strip().splitlines() or [""])[0]
        return JSONResponse({"error": f"{type(exc).__name__}: {first}"}, status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        query_token = request.query_params.get("token")
        refused = board.guard.refusal(request.method, request.headers, query_token, request.cookies)
        if refused is not None:
            return JSONResponse({"error": refused.error}, status_code=refused.status)
        if query_token and request.method == "GET" and request.url.path == "/":
            # the printed address: keep the token in a cookie and out of the address bar and history
            response: Response = RedirectResponse("/", status_code=303)
        else:
            response = await call_next(request)
        if query_token:
            response.set_cookie(board.guard.cookie, board.token, httponly=True, samesite="strict")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"   # no other page may frame the board and click it
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    # ------------------------------------------------------------------ the page
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return FileResponse(files[name])

    @app.get("/api/locale/{lang}")
    async def locale(lang: str):
        if lang not in LANGUAGES:
            raise BadInput(f"language {lang!r}: not one of {', '.join(LANGUAGES)}")
        return JSONResponse(json.loads((LOCALES / f"{lang}.json").read_text(encoding="utf-8")))

    # ------------------------------------------------------------------ configure
    @app.get("/api/catalog")
    async def catalog():
        return pipeline.catalog_json()

    @app.get("/api/files")
    async def files():
        data, models = await run_in_threadpool(board.ws.files)
        return {"workspace": str(board.ws.root), "files": data, "models": models}

    @app.get("/api/dataset_info")
    async def dataset_info(path: str):
        file = board.ws.existing(path, "--dataset-info")
        if file.is_dir():
            file = file / "dataset_info.json"
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BadInput(f"{path}: not a readable dataset_info.json") from None
        if not isinstance(entries, dict):
            raise BadInput(f"{path}: not a dataset_info.json (a JSON object of entries)")
        return {"entries": pipeline.dataset_entries(board.ws, file, entries)}

    @app.post("/api/pipeline")
    async def plan(request: Request):
        config = _pipeline(await request.body())
        run = board.runs.new_id(config.get("stage", "sft"), _method(config), config.get("run"))
        steps = board.validated(pipeline.train_steps(board.ws, config, run))
        return {"run": run, "steps": steps, "shell": pipeline.shell(steps), "makefile": pipeline.makefile(steps, run)}

    @app.post("/api/preview")
    async def data_preview(request: Request):
        from lmforge.shared.board.preview import preview

        config = _pipeline(await request.body())
        run = "PREVIEW"
        board.validated(pipeline.train_steps(board.ws, config, run)[:2])
        return await run_in_threadpool(preview, board.ws, config)

    # ------------------------------------------------------------------ run
    @app.post("/api/runs")
    async def start(request: Request):
        config = _pipeline(await request.body())
        run = board.runs.new_id(config.get("stage", "sft"), _method(config), config.get("run"))
        steps = board.validated(pipeline.train_steps(board.ws, config, run))
        run_dir = board.runs.create(run, steps, config)
        await run_in_threadpool(board.runs.start, run_dir)
        return {"id": run, "shell": pipeline.shell(steps)}

    @app.get("/api/runs")
    async def runs():
        return {"runs": await run_in_threadpool(board.runs.listing)}

    @app.get("/api/runs/{run}")
    async def run_detail(run: str, since: int = 0):
        return await run_in_threadpool(board.runs.detail, board.ws.run_dir(run), max(0, since))

    @app.get("/api/runs/{run}/makefile")
    async def run_makefile(run: str):
        state = board.runs.state(board.ws.run_dir(run))
        return PlainTextResponse(pipeline.makefile(state["steps"], run), headers={
            "Content-Disposition": f'attachment; filename="Makefile.{run}"'})

    @app.post("/api/runs/{run}/stop")
    async def stop(run: str, request: Request):
        parse(await request.body(), Empty, "stop")
        board.runs.stop(board.ws.run_dir(run))
        return {"id": run, "stopping": True}

    @app.post("/api/runs/{run}/resume")
    async def resume(run: str, request: Request):
        parse(await request.body(), Empty, "resume")
        await run_in_threadpool(board.runs.resume, board.ws.run_dir(run))
        return {"id": run, "resumed": True}

    # ------------------------------------------------------------------ evaluate, chat
    @app.post("/api/runs/{run}/eval")
    async def evaluate(run: str, request: Request):
        body = parse(await request.body(), EvalBody, "eval")
        run_dir = board.ws.run_dir(run)
        record = _finished(run_dir)
        kind = body.kind
        name = f"{kind}-{time.strftime('%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
        steps = board.validated(pipeline.eval_steps(board.ws, run_dir, record, kind, body.options,
                                                    name, board.runs.state(run_dir)["steps"]))
        job = board.runs.create(name, steps, {"kind": kind}, kind="eval", directory=run_dir / "evals" / name)
        await run_in_threadpool(board.runs.start, job)
        return {"id": name, "shell": pipeline.shell(steps)}

    @app.post("/api/chat")
    async def chat(request: Request):
        body = parse(await request.body(), ChatBody, "chat")
        run_dir = board.ws.run_dir(body.run)
        served = await run_in_threadpool(_served, board, run_dir)
        turns = [(m.role, m.content) for m in body.messages]
        if not turns or turns[-1][0] != "user":
            raise BadInput("chat: the conversation must end with a user message")
        from lmforge.shared.infer.engines import Job
        from lmforge.shared.model.generation import encode_chat_prompt

        prompt = served.renderer.generation_prompt(turns, body.system)
        ids, lead = encode_chat_prompt(served.tokenizer, prompt)
        if len(ids) >= served.context:
            raise BadInput("chat: the conversation no longer fits the model's context", "start a new one")
        max_tokens = min(body.max_tokens, served.context - len(ids))
        job = Job(prompt_ids=ids, max_tokens=max_tokens, temperature=body.temperature, lead=lead)

        async def events():
            async for event in served.engine.generate(job):
                if event.get("done"):
                    yield f"data: {json.dumps({'done': True, 'error': event.get('error')})}\n\n"
                    return
                yield f"data: {json.dumps({'text': event['text']}, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app


def _pipeline(raw: bytes) -> dict[str, Any]:
    """A pipeline body, checked field by field, as the plain dict the pipeline builder reads."""
    return parse(raw, PipelineBody, "pipeline").model_dump()


def _method(config: dict[str, Any]) -> str:
    options = (config.get("options") or {}).get(f"train {config.get('stage', 'sft')}") or {}
    method = str(options.get("method") or "lora")
    return method if method.replace("-", "").isalnum() else "run"


def _finished(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "model" / "lmforge.json").read_text())
    except (OSError, ValueError):
        raise BadInput(f"run {run_dir.name} has no finished model yet", "wait for it to finish") from None


def _served(board: Board, run_dir: Path):
    """The run's model as `serve` loads it (base + adapter for adapter runs), kept for the next turn."""
    from lmforge.shared.infer.app import prepare

    record = _finished(run_dir)
    model_dir = run_dir / "model"
    key = (str(record.get("base_model")), str(model_dir)) if record.get("kind") == "adapter" \
        else (str(model_dir), None)
    if key not in board.chat_models:
        board.chat_models.clear()   # one model in memory at a time
        board.chat_models[key] = prepare(key[0], key[1], "auto", "hf", 4, 4, None, run_dir.name)
    return board.chat_models[key]
