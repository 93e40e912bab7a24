"""Hooks for chat templates: how conversations become token sequences."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_chat_templates(register: Callable[..., None]) -> None:
    """Register chat templates (chatml, llama3, gemma, mistral, alpaca, ...).

    :param register: call ``register(template, replaces=None)`` once per template.

    Selected by ``chat_template:`` in the config (a name, or a path to a Jinja
    file). See :class:`ChatTemplate`.

    Example::

        @hookimpl
        def register_chat_templates(register):
            register(VicunaTemplate())
    """


@runtime_checkable
class ChatTemplate(Protocol):
    name: str
    description: str
    #: the Jinja source, in transformers' chat-template dialect
    template: str
