"""``objective: dpo`` - direct preference optimisation on chosen/rejected pairs.

The ``dpo`` loss plugin holds the variants (sigmoid, IPO, hinge, robust, SimPO,
...); regularisers such as ``ewc`` can join it under ``losses:``. The reference
log-probs come from the same model with the adapter disabled (or a frozen copy for
full fine-tuning). ``learning_rate: auto`` is a tenth of the PEFT method's rule.
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl


class DPO:
    name = "dpo"
    description = "Direct preference optimisation on chosen/rejected pairs (reference = adapter disabled)"
    batch_kind = "pairs"
    default_losses = ("dpo",)
    learning_rate_scale = 0.1

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.preference import train_on_pairs

        return train_on_pairs(session)


@hookimpl
def register_objectives(register: Any) -> None:
    register(DPO())
