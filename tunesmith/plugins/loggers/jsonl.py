"""``jsonl`` logger: the run directory's ``metrics.jsonl``, one JSON object per logged row.

Always on (the run summary, sweeps and ``tunesmith`` tests read the file). Each
row is ``{"step": N, "time_s": seconds since the logger opened, ...the logged
values}``; values that are not JSON numbers or text are written as text. Rows are
appended as they come (a crash loses at most the last, partial line,
which readers skip). On resume the rows of the earlier process up to the resumed
step are kept and the rest replaced, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

FILE = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v) if isinstance(v, float) or not isinstance(v, int) else v
    if hasattr(v, "item"):
        try:
            return float(v.item())
        except (TypeError, ValueError):
            pass
    return str(v)


def _row_json(row: dict) -> str:
    out = {}
    for k, v in row.items():
        v = _clean(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)  # NaN/inf are not JSON
        out[k] = v
    return json.dumps(out)


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl (a partial last line is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class JsonlRun:
    def __init__(self, path: Path, *, resume: bool, resume_step: int | None) -> None:
        self.path = path
        self.t0 = time.time()
        self.resume = resume
        self.resume_step = resume_step
        self.pending_truncate = resume
        if not resume:
            from tunesmith.core.io import atomic_write_text

            atomic_write_text(path, "")

    def _prepare(self, step: int) -> None:
        if not self.pending_truncate:
            return
        # keep what the earlier process logged before the point training resumed from
        cut = self.resume_step if self.resume_step is not None else step - 1
        keep = [r for r in read_rows(self.path) if isinstance(r.get("step"), (int, float)) and r["step"] <= cut]
        if keep:
            self.t0 = time.time() - float(keep[-1].get("time_s", 0) or 0)
        from tunesmith.core.io import atomic_write_text

        atomic_write_text(self.path, "".join(_row_json(r) + "\n" for r in keep))
        self.pending_truncate = False

    def log_params(self, params: dict) -> None:
        pass  # the run directory has config.yaml

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._prepare(step)
        row = {"step": step, "time_s": round(time.time() - self.t0, 2)}
        row.update(metrics)
        # opened per row: a file replaced or removed meanwhile is simply recreated
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_row_json(row) + "\n")

    def log_artifact(self, path: Any, kind: str) -> None:
        pass  # artefacts already live in the run directory

    def close(self, status: str, result: dict | None) -> None:
        pass


class JsonlLogger:
    name = "jsonl"
    description = "metrics.jsonl in the run directory (always on: the summary and sweeps read it)"
    always_on = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str = Field(FILE, description="File name inside the run directory.")

    def open(self, run: Any, options: Any, resume: bool) -> JsonlRun:
        from tunesmith.core.tracking import checkpoint_step

        options = options or self.Options()
        run_dir = Path(run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        step = run.state.get("resume_step") if isinstance(getattr(run, "state", None), dict) else None
        if resume and step is None and run.state.get("resume"):
            step = checkpoint_step(run_dir)  # the training session resumes from the newest checkpoint
        return JsonlRun(run_dir / options.file, resume=resume, resume_step=step)


@hookimpl
def register_loggers(register: Any) -> None:
    register(JsonlLogger())
