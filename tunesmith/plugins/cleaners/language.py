"""Language filter with py3langid (a maintained fork of langid.py; offline, no model download)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data import completion_text, full_text, prompt_text
from tunesmith.core.data_clean import Verdict


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Reject only when this sure of another language.")
    on: Literal["all", "prompt", "completion"] = Field("all", description="Which text to identify.")
    min_chars: int = Field(20, ge=0, description="Shorter texts are kept undecided (too little to judge).")
    max_chars: int = Field(2000, ge=50, description="Only the first characters are classified.")


_IDENTIFIER: Any = None


def identifier() -> Any:
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        # a relative MODEL_FILE resolves inside the package
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


class Language:
    name = "language"
    description = "Keep rows in the configured languages (py3langid), rejecting confident mismatches."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        opts = options or Options()
        ident = identifier()
        keep = {c.lower() for c in opts.languages}
        pick = {"all": full_text, "prompt": prompt_text, "completion": completion_text}[opts.on]
        for r in records:
            text = pick(r)[: opts.max_chars]
            if len(text.strip()) < opts.min_chars:
                yield Verdict.keep(r)
                continue
            lang, conf = ident.classify(text)
            if lang not in keep and conf >= opts.min_confidence:
                yield Verdict.reject(r, f"language '{lang}' (confidence {conf:.2f}) not in {sorted(keep)}", f"language_{lang}")
            else:
                yield Verdict.keep(r)


@hookimpl
def register_cleaners(register):
    register(Language())
