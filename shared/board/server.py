"""The board's web app (FastAPI, as `serve` uses): a JSON API over pipeline/runs/preview, the one
static page, and chat streamed through the same code as `lmforge serve` (infer.app.prepare, the
engine's generate, the template's generation prompt)."""

# no `from __future__ import annotations`: FastAPI resolves the route parameters' annotations at run time

import hmac
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from lmforge.shared.board import pipeline
from lmforge.shared.board.runs import Runs
from lmforge.shared.board.workspace import Workspace
from lmforge.shared.core.errors import BadInput

PACKAGE = Path(__file__).resolve().parent
STATIC = PACKAGE / "static"
LOCALES = PACKAGE / "locales"
LANGUAGES = ("en", "zh", "ru")
COOKIE = "lmforge_board_token"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

Check = Callable[[list[str]], Optional[str]]   # a command line -> the command's own usage error, or None


class Board:
    """What the app works on: the workspace, its runs, how to check a command line, loaded chat models."""

    def __init__(self, workspace: str | Path, token: str | None = None, check: Check | None = None,
                 host: str = "127.0.0.1"):
        self.ws = Workspace(workspace)
        self.runs = Runs(self.ws)
        self.token = token
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
                    raise BadInput(problem)
        return steps


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise BadInput("the request is not JSON") from None
    if not isinstance(data, dict):
        raise BadInput("the request is not a JSON object")
    return data


def create_app(board: Board):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="lmforge board", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadInput)
    async def bad_input(request, exc: BadInput):
        return JSONResponse({"error": exc.one_line()}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        first = (str(exc).strip().splitlines() or [""])[0]
        return JSONResponse({"error": f"{type(exc).__name__}: {first}"}, status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = _hostname(request.headers.get("host") or "")
        if board.token:
            given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
            if not given or not hmac.compare_digest(given.encode(), board.token.encode()):
                return JSONResponse({"error": "this board needs its token: open it as http://HOST:PORT/?token=TOKEN"},
                                    status_code=401)
        elif host not in LOCAL_HOSTS | {board.host}:   # DNS rebinding: a page elsewhere naming this port
            return JSONResponse({"error": f"host {host!r} refused: the board answers on {board.host} only"},
                                status_code=403)
        response = await call_next(request)
        if board.token and request.query_params.get("token"):
            response.set_cookie(COOKIE, board.token, httponly=True, samesite="strict")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
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
        return {"entries": [{"name": k, **({"file": v.get("file_name"), "format": v.get("formatting", "alpaca"),
                                             "ranking": v.get("ranking", False)} if isinstance(v, dict) else {})}
                            for k, v in entries.items()]}

    @app.post("/api/pipeline")
    async def plan(request: Request):
        config = _body(await request.body())
        run = board.runs.new_id(config.get("stage", "sft"), _method(config), config.get("run"))
        steps = board.validated(pipeline.train_steps(board.ws, config, run))
        return {"run": run, "steps": steps, "shell": pipeline.shell(steps), "makefile": pipeline.makefile(steps, run)}

    @app.post("/api/preview")
    async def data_preview(request: Request):
        from lmforge.shared.board.preview import preview

        config = _body(await request.body())
        run = "PREVIEW"
        board.validated(pipeline.train_steps(board.ws, config, run)[:2])
        return await run_in_threadpool(preview, board.ws, config)

    # ------------------------------------------------------------------ run
    @app.post("/api/runs")
    async def start(request: Request):
        config = _body(await request.body())
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
    async def stop(run: str):
        board.runs.stop(board.ws.run_dir(run))
        return {"id": run, "stopping": True}

    @app.post("/api/runs/{run}/resume")
    async def resume(run: str):
        await run_in_threadpool(board.runs.resume, board.ws.run_dir(run))
        return {"id": run, "resumed": True}

    # ------------------------------------------------------------------ evaluate, chat
    @app.post("/api/runs/{run}/eval")
    async def evaluate(run: str, request: Request):
        body = _body(await request.body())
        run_dir = board.ws.run_dir(run)
        record = _finished(run_dir)
        kind = str(body.get("kind") or "")
        name = f"{kind}-{time.strftime('%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
        steps = board.validated(pipeline.eval_steps(board.ws, run_dir, record, kind, body.get("options") or {},
                                                    name, board.runs.state(run_dir)["steps"]))
        job = board.runs.create(name, steps, {"kind": kind}, kind="eval", directory=run_dir / "evals" / name)
        await run_in_threadpool(board.runs.start, job)
        return {"id": name, "shell": pipeline.shell(steps)}

    @app.post("/api/chat")
    async def chat(request: Request):
        body = _body(await request.body())
        run_dir = board.ws.run_dir(str(body.get("run") or ""))
        served = await run_in_threadpool(_served, board, run_dir)
        turns = [(str(m.get("role")), str(m.get("content") or "")) for m in body.get("messages") or []
                 if isinstance(m, dict)]
        if not turns or turns[-1][0] != "user":
            raise BadInput("chat: the conversation must end with a user message")
        from lmforge.shared.infer.engines import Job
        from lmforge.shared.model.generation import encode_chat_prompt

        prompt = served.renderer.generation_prompt(turns, str(body.get("system") or ""))
        ids, lead = encode_chat_prompt(served.tokenizer, prompt)
        if len(ids) >= served.context:
            raise BadInput("chat: the conversation no longer fits the model's context", "start a new one")
        max_tokens = min(int(body.get("max_tokens") or 128), served.context - len(ids))
        job = Job(prompt_ids=ids, max_tokens=max_tokens, temperature=float(body.get("temperature") or 0.0),
                  lead=lead)

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


def _hostname(header: str) -> str:
    """The host of a Host header: 'localhost:7860' -> 'localhost', '[::1]:7860' -> '[::1]'."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


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
