"""Small shared types of the serving package (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.core.errors import TunesmithError

#: the model name that means "the base model, no adapter"
BASE_NAME = "base"
#: with a registry: the name routed to the production or canary version
ROUTED_NAME = "production"


class ServingError(TunesmithError):
    """An error with the HTTP status, OpenAI error ``type``/``code`` and headers to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type_
        self.param = param
        self.headers = headers or {}


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
