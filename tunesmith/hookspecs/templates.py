"""Hooks for chat templates: how conversations become token sequences."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

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
    """A chat template: how a conversation becomes the text a model is trained on.

    ``template`` is the Jinja source in transformers' chat-template dialect (it
    sees ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``);
    it is set as the tokenizer's ``chat_template`` and saved with every artefact
    (adapter and merged tokenizer files, GGUF ``tokenizer.chat_template``).
    """

    name: str
    description: str
    #: the Jinja source, in transformers' chat-template dialect
    template: str

    #: special tokens the template writes literally (``<|im_start|>``, ...); those the
    #: vocabulary lacks are added, the embeddings resized and the new rows trained
    special_tokens: tuple[str, ...] = ()
    #: the token that ends an assistant turn (trained, and EOS for generation);
    #: ``None``: the tokenizer's EOS (templates that write ``{{ eos_token }}``)
    end_of_turn: str | None = None
    #: the system prompt the template uses when a conversation has none
    default_system: str | None = None
    #: the same template in Ollama's Go-template syntax (Modelfile ``TEMPLATE``);
    #: ``None``: the Modelfile carries no TEMPLATE and Ollama reads the GGUF's
    ollama_template: str | None = None
    #: extra stop strings for servers (the end-of-turn token is always one)
    stop: tuple[str, ...] = ()

    #: the optional members above; core supplies the defaults shown
    OPTIONAL: ClassVar[tuple[str, ...]] = ("special_tokens", "end_of_turn", "default_system", "ollama_template", "stop")
