"""Hooks for data: formats, cleaners and synthetic-data generators."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol, runtime_checkable

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
    """A data format. Core reads only the members below."""

    name: str
    description: str
    #: the canonical record kind it produces: ``chat``, ``pairs``, ``text`` (or a kind
    #: of its own, such as KTO's ``unpaired``)
    kind: str | None = None
    #: the row keys it reads; any other key is an error (``metadata`` always allowed)
    fields: tuple[str, ...] = ()
    #: how to describe the expected row in an error, when ``fields`` alone is unclear
    fields_hint: str | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("kind", "fields", "fields_hint", "validate", "from_canonical")

    def detect(self, row: dict) -> bool:
        """Whether a raw row is in this format (``format: auto`` asks every format)."""

    def to_canonical(self, row: dict) -> dict:
        """The canonical record of a valid row."""

    def validate(self, row: dict) -> list[str]:
        """Optional: what is wrong with a row (empty: valid); rejects name these."""

    def from_canonical(self, record: dict) -> dict:
        """Optional: a canonical record back in this format (``tunesmith data convert``)."""


@runtime_checkable
class Cleaner(Protocol):
    """A data cleaner. Core reads only the members below."""

    name: str
    description: str
    #: its place in the default chain (run when the config lists no ``cleaners:``),
    #: lowest first; ``None``: it runs only when listed
    default_order: int | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("default_order",)

    def apply(self, records: Iterable[dict], options: Any, context: Any) -> Iterator[Any]:
        """Yield kept records and rejects (see docs/data.md)."""


@runtime_checkable
class Generator(Protocol):
    name: str
    description: str

    def generate(self, prompts: list[str], options: Any, context: Any) -> list[str]:
        """One generated text per prompt."""
