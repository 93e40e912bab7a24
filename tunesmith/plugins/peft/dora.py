"""DoRA: weight-decomposed LoRA (magnitude + low-rank direction, peft); mergeable."""

from __future__ import annotations

from tunesmith import hookimpl
from tunesmith.plugins.peft.lora import LoRA


class DoRA(LoRA):
    name = "dora"
    description = "DoRA weight-decomposed low-rank adapters (LoRA options); mergeable"
    use_dora = True


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(DoRA())
