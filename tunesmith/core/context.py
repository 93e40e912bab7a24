"""The object every lifecycle hook and plugin method receives as ``context``/``run``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """What a plugin may need to know about the run it takes part in.

    ``hook`` is pluggy's hook relay: ``run.hook.after_step(run=run, step=3, logs={})``.
    ``state`` is a free-form dict plugins may use to share values within a run.
    """

    config: Any = None
    run_dir: Path | None = None
    registries: Any = None
    model: Any = None
    tokenizer: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None

    @property
    def hook(self) -> Any:
        return getattr(self.registries, "hook", None)

    def request_stop(self, reason: str) -> None:
        """Ask the trainer to stop after the current step."""
        self.stop_reason = reason

    def emit(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a lifecycle hook if any plugin implements it; returns the results."""
        relay = self.hook
        if relay is None:
            return []
        return getattr(relay, hook_name)(run=self, **kwargs)
