"""The rating page: a small local web app that serves one blinded item at a time.

``create_app(sheet, answers)`` returns a FastAPI app; :func:`serve_sheet` runs it
with uvicorn on 127.0.0.1. Every answer (even one radio button) is written to the
answers file at once, atomically (the whole file is rewritten to a temporary file
and renamed), so a closed browser or a killed server loses nothing. The answers
file is JSONL in the shape of a filled ``sheet.jsonl``: ``import_ratings`` reads it.
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from tunesmith.human_eval.sheets import CRITERIA, SCALE, read_sheet
from tunesmith.core.io import atomic_write_jsonl, iter_jsonl

PAGE_PACKAGE = "tunesmith.human_eval.page"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def default_answers_path(sheet: str | Path) -> Path:
    p = Path(sheet)
    return p.with_name(p.stem + ".answers.jsonl")


class AnswerStore:
    """Answers keyed by (rater, item); each save rewrites the file atomically."""

    def __init__(self, path: Path, items: list[dict], criteria: list[str]) -> None:
        self.path = path
        self.items = {it["item_id"]: it for it in items}
        self.criteria = criteria
        self._lock = threading.Lock()
        self.answers: dict[tuple[str, str], dict] = {}
        if path.exists():
            for _i, row in iter_jsonl(path.read_text(encoding="utf-8"), path):
                self.answers[(row["rater"], row["item_id"])] = row

    def complete(self, row: dict) -> bool:
        item = self.items[row["item_id"]]
        return all(
            isinstance((row["scores"].get(o["label"]) or {}).get(c), int) for o in item["outputs"] for c in self.criteria
        )

    def for_rater(self, rater: str) -> dict[str, dict]:
        return {item: row for (r, item), row in self.answers.items() if r == rater}

    def save(self, payload: dict) -> dict:
        """Validate and store one answer; returns the stored row. Raises ValueError."""
        rater = str(payload.get("rater") or "").strip()
        if not rater:
            raise ValueError("enter your name before rating")
        item_id = payload.get("item_id")
        if item_id not in self.items:
            raise ValueError(f"unknown item {item_id!r}")
        labels = {o["label"] for o in self.items[item_id]["outputs"]}
        scores_in = payload.get("scores") or {}
        if not isinstance(scores_in, dict):
            raise ValueError("scores must be an object")
        scores: dict[str, dict] = {}
        for label in sorted(labels):
            given = scores_in.get(label) or {}
            scores[label] = {}
            for c in self.criteria:
                v = given.get(c)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not SCALE[0] <= v <= SCALE[1]):
                    raise ValueError(f"{c} of output {label} must be a whole number {SCALE[0]}–{SCALE[1]}, got {v!r}")
                scores[label][c] = v
        unknown = set(scores_in) - labels
        if unknown:
            raise ValueError(f"item {item_id} has no output {', '.join(sorted(unknown))}")
        row = {
            "item_id": item_id,
            "rater": rater,
            "scores": scores,
            "comment": str(payload.get("comment") or ""),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with self._lock:
            self.answers[(rater, item_id)] = row
            atomic_write_jsonl(self.path, [self.answers[k] for k in sorted(self.answers)])
        return row


def create_app(sheet: str | Path, answers: str | Path | None = None, *, criteria: list[str] | None = None) -> Any:
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response

    sheet = Path(sheet)
    items = read_sheet(sheet)
    crits = list(criteria or _criteria_of(items))
    store = AnswerStore(Path(answers) if answers else default_answers_path(sheet), items, crits)
    blinded = [
        {"item_id": it["item_id"], "prompt": it["prompt"], "reference": it.get("reference"), "outputs": it["outputs"]}
        for it in items
    ]
    app = FastAPI(title="tunesmith rating page", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    def _static(name: str) -> Response:
        data = resources.files(PAGE_PACKAGE).joinpath(name).read_bytes()
        return Response(content=data, media_type=_TYPES[Path(name).suffix], headers={"Cache-Control": "no-store"})

    @app.get("/")
    def index() -> Response:
        return _static("index.html")

    @app.get("/app.js")
    def app_js() -> Response:
        return _static("app.js")

    @app.get("/style.css")
    def style() -> Response:
        return _static("style.css")

    @app.get("/api/sheet")
    def get_sheet() -> dict:
        return {"name": sheet.name, "criteria": crits, "scale": list(SCALE), "items": blinded}

    @app.get("/api/answers")
    def get_answers(rater: str) -> dict:
        mine = store.for_rater(rater.strip())
        return {"answers": mine, "complete": sorted(i for i, r in mine.items() if store.complete(r)), "total": len(items)}

    @app.post("/api/answers")
    def post_answer(payload: dict) -> dict:
        try:
            row = store.save(payload)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        mine = store.for_rater(row["rater"])
        return {"saved": row, "complete": sorted(i for i, r in mine.items() if store.complete(r)), "total": len(items)}

    return app


def _criteria_of(items: list[dict]) -> list[str]:
    for it in items:
        for sc in (it.get("scores") or {}).values():
            if isinstance(sc, dict) and sc:
                return list(sc)
    return list(CRITERIA)


def serve_sheet(sheet: str | Path, *, host: str = "127.0.0.1", port: int = 8765, answers: str | Path | None = None) -> None:
    import uvicorn

    app = create_app(sheet, answers)
    uvicorn.run(app, host=host, port=port, log_level="warning")
