"""``objective: sft`` - supervised fine-tuning on chat or text records.

Chat records train on the assistant turns only (completion-only masks, each turn's
end-of-turn token included); text records on every token. The loss is the
configured loss plugins' weighted sum (default ``causal_lm``).
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl


class SFT:
    name = "sft"
    description = "Supervised fine-tuning on chat/text records (completion-only loss on assistant turns)"
    batch_kind = "tokens"
    default_losses = ("causal_lm",)

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.training import train_on_tokens

        return train_on_tokens(session)


@hookimpl
def register_objectives(register: Any) -> None:
    register(SFT())
