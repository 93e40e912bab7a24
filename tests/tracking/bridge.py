"""Drive :func:`tunesmith.core.tracking.open_loggers` from the lifecycle hooks.

The training session calls the LoggerSet itself once it is wired (see
core/session.py); until then the end-to-end tests install this plugin, which does
what the session will do: open at ``before_train``, every logged row at
``after_log``, plots and the final adapter at ``after_train``, failed on
``on_train_error``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith import hookimpl


def session_wires_loggers() -> bool:
    import tunesmith.core.session as session

    return "open_loggers" in Path(session.__file__).read_text(encoding="utf-8")


class LoggerBridge:
    def __init__(self) -> None:
        self.sets: list[Any] = []

    @hookimpl
    def before_train(self, run: Any) -> None:
        from tunesmith.core.tracking import open_loggers

        run.state["bridge_loggers"] = open_loggers(run.config, run.registries, run)
        self.sets.append(run.state["bridge_loggers"])

    @hookimpl
    def after_log(self, run: Any, step: int, logs: dict) -> None:
        run.state["bridge_loggers"].log_metrics(logs, step)

    @hookimpl
    def after_train(self, run: Any, result: dict) -> None:
        from tunesmith.core.tracking import run_artifacts

        loggers = run.state["bridge_loggers"]
        for path, kind in run_artifacts(run.run_dir, "train"):
            loggers.log_artifact(path, kind)
        loggers.close("finished", result)

    @hookimpl
    def on_train_error(self, run: Any, error: BaseException) -> None:
        loggers = run.state.get("bridge_loggers")
        if loggers is not None:
            loggers.close("failed", None)
