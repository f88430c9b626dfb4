"""The annotation web app (FastAPI + Jinja2, plain HTML and JavaScript; no front-end build).

``GET /`` names the task and asks for the rater's name; ``GET /rate?rater=NAME`` is the rating page (keyboard
shortcuts, progress); the page talks to ``GET /api/next`` and ``POST /api/answer``; ``GET /images/NAME`` serves the
task's images. With a token (required when the server listens beyond localhost), every request carries it as
``?token=`` or the ``X-Emu-Token`` header. An answer is on disk (fsynced) before it is acknowledged.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates

from emu.annotate.store import AnswerStore, DuplicateAnswer
from emu.annotate.tasks import curation_key, left_side, load_task, next_item, progress, vote_key
from emu.evaluation.human_votes import check_vote

RATER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
MAX_BODY = 16 * 1024
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rater(name: str | None) -> str:
    if not name or not RATER.match(name):
        raise HTTPException(
            400, "rater names are 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def create_app(task_dir: str | Path, token: str | None = None) -> FastAPI:
    """The app for one task folder; ``token``: required on every request when given."""
    folder = Path(task_dir).resolve()
    task = load_task(folder)
    key_of = curation_key if task["kind"] == "curation" else vote_key
    store = AnswerStore(folder / task["answers"], key_of)
    images = (folder / ("candidates" if task["kind"] == "curation" else "images")).resolve()
    app = FastAPI(title=f"emu annotate: {task['kind']}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.task, app.state.store = task, store

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.query_params.get("token") or request.headers.get("x-emu-token") or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required (?token=... or X-Emu-Token)"}, 401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request bodies are limited to {MAX_BODY} bytes"}, 413)
        return await call_next(request)

    def item_view(item: dict | None, rater: str) -> dict[str, Any] | None:
        """What the page shows for an item (the A/B sides already randomised for this rater)."""
        if item is None:
            return None
        if task["kind"] == "curation":
            return {"id": item["key"], "image": item["file"]}
        left = left_side(task, rater, item)
        right = "b" if left == "a" else "a"
        return {"id": item["pair"], "left": left, "left_image": item[left], "right_image": item[right],
                "prompt": item["prompt"] if task["show_prompt"] else None}  # fmt: skip

    def state(rater: str) -> dict[str, Any]:
        return {"item": item_view(next_item(task, store.rows, rater), rater),
                "progress": progress(task, store.rows, rater)}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return TEMPLATES.TemplateResponse(request, "index.html", {"task": task, "progress": progress(task, store.rows),
                                                                   "token": token or ""})  # fmt: skip

    @app.get("/rate", response_class=HTMLResponse)
    def rate(request: Request, rater: str | None = None):
        name = _rater(rater)
        page = "curation.html" if task["kind"] == "curation" else "ab.html"
        return TEMPLATES.TemplateResponse(request, page, {"task": task, "rater": name, "token": token or "",
                                                          **state(name)})  # fmt: skip

    @app.get("/api/next")
    def api_next(rater: str | None = None):
        return state(_rater(rater))

    @app.get("/api/progress")
    def api_progress():
        return {"all": progress(task, store.rows), "answers": len(store.rows)}

    @app.post("/api/answer")
    async def answer(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY:  # a body sent without a Content-Length (chunked) is measured here
            raise HTTPException(413, f"request bodies are limited to {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise HTTPException(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        rater = _rater(body.get("rater"))
        row = curation_row(body, rater) if task["kind"] == "curation" else vote_row(body, rater)
        try:
            store.append(row)
        except DuplicateAnswer as e:
            raise HTTPException(409, str(e)) from None
        return state(rater)

    def curation_row(body: dict, rater: str) -> dict[str, Any]:
        keys = {it["key"] for it in task["items"]}
        if body.get("key") not in keys:
            raise HTTPException(400, "unknown candidate key")
        row: dict[str, Any] = {"key": body["key"], "annotator": rater, "time": _now()}
        for p in task["principles"]:
            if not isinstance(body.get(p), bool):
                raise HTTPException(400, f"'{p}' must be true or false")
            row[p] = int(body[p])
        if not isinstance(body.get("keep"), bool):
            raise HTTPException(400, "'keep' must be true or false")
        row["keep"] = int(body["keep"])
        return row

    def vote_row(body: dict, rater: str) -> dict[str, Any]:
        items = {p["pair"]: p for p in task["pairs"]} | {c["pair"]: c for c in task["checks"]}
        item = items.get(body.get("pair"))
        if item is None:
            raise HTTPException(400, "unknown pair")
        left = left_side(task, rater, item)
        if body.get("left") != left:  # the page shows what the server drew; anything else is not this rater's view
            raise HTTPException(400, "'left' does not match the side this rater was shown")
        row = {"pair": item["pair"], "question": task["question"], "rater": rater, "choice": body.get("choice"),
               "left": left, "time": _now(), "check": item.get("check"), "expect": item.get("expect")}  # fmt: skip
        if item.get("check") == "repeat":
            row["of"] = item["of"]
        problem = check_vote(row)
        if problem:
            raise HTTPException(400, problem)
        return row

    @app.get("/images/{name}")
    def image(name: str):
        path = (images / name).resolve()
        if path.parent != images or not path.is_file():  # never outside the task's image folder
            raise HTTPException(404, "no such image")
        return FileResponse(path)

    return app
