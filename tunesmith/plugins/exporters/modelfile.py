"""An Ollama ``Modelfile`` beside an exported GGUF file.

``FROM`` the GGUF file (and ``ADAPTER`` a GGUF LoRA), ``TEMPLATE`` the chat template
in Ollama's Go-template syntax, ``PARAMETER stop`` for each end-of-turn token and
``SYSTEM`` where the template has a default system prompt. The Go template comes
from the built-in template (``chat_templates`` plugins, member ``ollama_template``)
whose rendering equals the tokenizer's own (detected by rendering, so a tokenizer
that ships ChatML with a default system prompt, like SmolLM2's, gets ChatML plus
that ``SYSTEM``). A template no built-in matches gets no ``TEMPLATE`` line: Ollama
then reads ``tokenizer.chat_template`` from the GGUF metadata; the file says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _quote(text: str) -> str:
    """A Modelfile triple-quoted value (Ollama has no escape for a triple quote inside)."""
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(tokenizer: Any, *, model: str, adapter: str | None = None, registries: Any = None) -> str:
    """The Modelfile for a GGUF file ``model`` (a path relative to the Modelfile's folder)."""
    from tunesmith.core.models import end_of_turn_token
    from tunesmith.core.registry import member
    from tunesmith.core.templates import _registries, detect_builtin

    regs = _registries(registries)
    name, detected_system = detect_builtin(tokenizer, regs)
    lines = [f"FROM ./{model}" if not model.startswith(("/", "./")) else f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}" if not adapter.startswith(("/", "./")) else f"ADAPTER {adapter}")
    eot = end_of_turn_token(tokenizer)
    stops: list[str] = [t for t in dict.fromkeys((eot, tokenizer.eos_token)) if t]
    system = detected_system
    if name is not None:
        obj = regs.chat_templates.get(name)
        go = member(obj, "chat_templates", "ollama_template")
        if system is None:
            system = member(obj, "chat_templates", "default_system")
        if go:
            eos = tokenizer.eos_token or ""
            lines.append(f"TEMPLATE {_quote(go.replace('[[eos_token]]', eos))}")
        else:
            lines.append(f"# chat template '{name}' has no Go form: Ollama uses the GGUF's tokenizer.chat_template")
        for t in member(obj, "chat_templates", "stop") or ():
            if t not in stops:
                stops.append(t)
    else:
        lines.append("# the chat template matches no built-in: Ollama uses the GGUF's tokenizer.chat_template")
    for t in stops:
        lines.append(f"PARAMETER stop {json.dumps(t)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, tokenizer: Any, *, model: str, adapter: str | None = None,
                    registries: Any = None) -> Path:
    from tunesmith.core.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, modelfile_text(tokenizer, model=model, adapter=adapter, registries=registries))
    return path
