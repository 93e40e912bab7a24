"""``objective: cpt`` - continued pre-training: every token of the text, chunked.

Text records (and chat records rendered with the chat template) are tokenised,
concatenated and cut into ``training.max_length`` chunks; every token is trained.
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl


class ContinuedPretraining:
    name = "cpt"
    description = "Continued pre-training: every token of a text corpus, chunked to max_length"
    batch_kind = "tokens"
    default_losses = ("causal_lm",)

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.training import train_on_tokens

        return train_on_tokens(session, continued=True)


@hookimpl
def register_objectives(register: Any) -> None:
    register(ContinuedPretraining())
