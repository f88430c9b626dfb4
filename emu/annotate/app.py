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
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from emu.annotate.store import AnswerStore, DuplicateAnswer, QuotaFilled
from emu.annotate.tasks import curation_key, full, left_side, load_task, next_item, progress, vote_key
from emu.evaluation.human_votes import check_vote

RATER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
MAX_BODY = 16 * 1024
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rater(name: Any) -> str:
    if not isinstance(name, str) or not RATER.fullmatch(name):
        raise HTTPException(
            400, "rater names are 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _hostname(host: str) -> str:
    """``Host`` without its port (``[::1]:8765`` -> ``[::1]``)."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


def create_app(task_dir: str | Path, token: str | None = None) -> FastAPI:
    """The app for one task folder; ``token``: required on every request when given. Without one, only requests
    addressed to this machine (``Host: 127.0.0.1 / localhost / [::1]``) are served, so a web page elsewhere cannot
    reach the app through DNS rebinding; answers must be ``application/json`` (a cross-site form cannot send that)."""
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
        else:
            if _hostname(request.headers.get("host", "")) not in LOCAL_HOSTS:
                return JSONResponse({"detail": "without a token only this machine is served (Host: 127.0.0.1)"}, 403)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"detail": "answers are posted as application/json"}, 415)
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
        left = left_side(task, rater, item)  # the sides stay on the server: the page never learns which model is which
        right = "b" if left == "a" else "a"
        return {"id": item["pair"], "left_image": item[left], "right_image": item[right],
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
        raw = b""
        async for chunk in request.stream():  # a body sent without a Content-Length (chunked) is capped here
            raw += chunk
            if len(raw) > MAX_BODY:
                raise HTTPException(413, f"request bodies are limited to {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise HTTPException(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        rater = _rater(body.get("rater"))
        row = curation_row(body, rater) if task["kind"] == "curation" else vote_row(body, rater)
        try:  # fsync and the next item off the event loop
            await run_in_threadpool(store.append, row, partial(full, task))
        except (DuplicateAnswer, QuotaFilled) as e:  # a second tab, a double submit: say so, and what is next
            raise HTTPException(409, {"message": str(e), **await run_in_threadpool(state, rater)}) from None
        return await run_in_threadpool(state, rater)

    def curation_row(body: dict, rater: str) -> dict[str, Any]:
        keys = {it["key"] for it in task["items"]}
        if not isinstance(body.get("key"), str) or body["key"] not in keys:
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
        item = items.get(body["pair"]) if isinstance(body.get("pair"), str) else None
        if item is None:
            raise HTTPException(400, "unknown pair")
        left = left_side(task, rater, item)  # what this rater was shown, drawn here as for the page
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
        try:
            path = (images / name).resolve()  # symlinks followed: the real file must be in the image folder
            ok = path.parent == images and path.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long for the file system
            ok = False
        if not ok:
            raise HTTPException(404, "no such image")
        return FileResponse(path)

    return app
