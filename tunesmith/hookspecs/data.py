"""Hooks for data: formats, cleaners and synthetic-data generators."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_data_formats(register: Callable[..., None]) -> None:
    """Register data formats (alpaca, sharegpt, messages, preference pairs, raw text, ...).

    :param register: call ``register(fmt, replaces=None)`` once per format.

    A format converts the rows of a file to one of tunesmith's canonical records
    and back. ``kind`` says which: ``"chat"`` (``{"messages": [{"role", "content"}],
    "metadata": {...}}``), ``"pairs"`` (``{"prompt": [messages], "chosen": [messages],
    "rejected": [messages], "metadata": {...}}``) or ``"text"`` (``{"text": str,
    "metadata": {...}}``). It needs ``name``, ``description``, ``kind`` and::

        def detect(self, row: dict) -> bool          # does this row look like mine?
        def validate(self, row: dict) -> list[str]   # problems, empty when valid
        def to_canonical(self, row: dict) -> dict
        def from_canonical(self, record: dict) -> dict

    Example::

        @hookimpl
        def register_data_formats(register):
            register(JiraTicketsFormat())
    """


@hookspec
def register_cleaners(register: Callable[..., None]) -> None:
    """Register data cleaners, which run in the order the config lists them.

    :param register: call ``register(cleaner, replaces=None)`` once per cleaner.

    A cleaner needs ``name``, ``description``, ``Options`` and::

        def apply(self, records: Iterable[dict], options, context) -> Iterator[Verdict]

    yielding, for each canonical record in, either the (possibly rewritten) record
    or a rejection with a reason; nothing may be dropped silently. See
    :mod:`tunesmith.core.data` for ``Verdict``.

    Example::

        @hookimpl
        def register_cleaners(register):
            register(ProfanityFilter())
    """


@hookspec
def register_generators(register: Callable[..., None]) -> None:
    """Register synthetic-data generators (paraphrase, new examples from seeds).

    :param register: call ``register(generator, replaces=None)`` once per generator.

    A generator needs ``name``, ``description``, ``Options`` and::

        def generate(self, prompts: list[str], options, context) -> list[str]

    Example::

        @hookimpl
        def register_generators(register):
            register(MyLLMGateway())
    """


@runtime_checkable
class DataFormat(Protocol):
    name: str
    description: str
    kind: str

    def detect(self, row: dict) -> bool: ...

    def to_canonical(self, row: dict) -> dict: ...


@runtime_checkable
class Cleaner(Protocol):
    name: str
    description: str

    def apply(self, records: Iterable[dict], options: Any, context: Any) -> Iterator[Any]: ...


@runtime_checkable
class Generator(Protocol):
    name: str
    description: str

    def generate(self, prompts: list[str], options: Any, context: Any) -> list[str]: ...
