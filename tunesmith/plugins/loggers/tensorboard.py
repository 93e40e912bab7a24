"""``tensorboard`` logger: scalars (and the config and reports as text, plots as images)
under ``RUN/tensorboard/``.

Tags: a key with a ``/`` as it is, ``eval_x`` as ``eval/x``, anything else as
``train/x``. On resume, the events the earlier process wrote after the resumed step
are purged (``SummaryWriter(purge_step=...)``), so the curves do not double back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

#: text artefacts shown in TensorBoard's Text tab (larger files are skipped)
TEXT_LIMIT = 200_000


def tag_of(key: str) -> str:
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return f"train/{key}"


class TensorBoardRun:
    def __init__(self, log_dir: Path, *, resume: bool, resume_step: int | None, flush_secs: int) -> None:
        self.log_dir = log_dir
        self.resume = resume
        self.resume_step = resume_step
        self.flush_secs = flush_secs
        self.writer: Any = None

    def _writer(self, step: int | None = None) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None
            if self.resume:
                purge = (self.resume_step + 1) if self.resume_step is not None else step
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge, flush_secs=self.flush_secs)
        return self.writer

    def log_params(self, params: dict) -> None:
        pass  # the config goes to the Text tab with log_artifact("config")

    def log_metrics(self, metrics: dict, step: int) -> None:
        from tunesmith.core.tracking import numeric

        values = {k: v for k, v in numeric(metrics).items() if k != "epoch"}
        if not values:
            return
        w = self._writer(step)
        for k, v in values.items():
            w.add_scalar(tag_of(k), v, step)
        if "epoch" in metrics:
            w.add_scalar("train/epoch", float(metrics["epoch"]), step)
        w.flush()

    def log_artifact(self, path: Any, kind: str) -> None:
        p = Path(path)
        if p.is_dir():
            return
        if p.suffix in (".md", ".yaml", ".yml", ".json", ".txt") and p.stat().st_size <= TEXT_LIMIT:
            text = p.read_text(encoding="utf-8", errors="replace")
            if p.suffix != ".md":  # TensorBoard renders Markdown; keep other text verbatim
                text = "    " + text.replace("\n", "\n    ")
            self._writer().add_text(f"{kind}/{p.name}", text)
            self.writer.flush()
        elif p.suffix == ".png" and kind == "plot":
            import matplotlib.image as mpimg

            img = mpimg.imread(str(p))
            self._writer().add_image(f"plots/{p.stem}", img[..., :3] if img.ndim == 3 else img,
                                     dataformats="HWC" if img.ndim == 3 else "HW")
            self.writer.flush()

    def close(self, status: str, result: dict | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TensorBoardLogger:
    name = "tensorboard"
    description = "TensorBoard event files in RUN/tensorboard (scalars; config and reports as text; plots as images)"
    enabled_by_default = True  # what a config without report_to gets

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        log_dir: str | None = Field(None, description="Where the event files go (default RUN/tensorboard).")
        flush_secs: int = Field(30, ge=1, description="How often pending events are written to disk.")

    def open(self, run: Any, options: Any, resume: bool) -> TensorBoardRun:
        from tunesmith.core.tracking import checkpoint_step

        options = options or self.Options()
        run_dir = Path(run.run_dir)
        log_dir = Path(options.log_dir) if options.log_dir else run_dir / "tensorboard"
        if not log_dir.is_absolute():
            log_dir = run_dir / log_dir
        state = run.state if isinstance(getattr(run, "state", None), dict) else {}
        step = state.get("resume_step")
        if resume and step is None and state.get("resume"):
            step = checkpoint_step(run_dir)
        if not resume and log_dir.is_dir():  # a fresh run: the earlier run's curves go
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
        import torch.utils.tensorboard  # noqa: F401 - fail at open, not at the first row, if it is missing

        return TensorBoardRun(log_dir, resume=resume, resume_step=step, flush_secs=options.flush_secs)


@hookimpl
def register_loggers(register: Any) -> None:
    register(TensorBoardLogger())
