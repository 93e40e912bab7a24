"""The cleaning pipeline: cleaner plugins in order, every drop accounted for.

A cleaner's ``apply(records, options, context)`` yields one :class:`Verdict` per
record it receives, in order: the (possibly rewritten) record, or a rejection with
a reason. :func:`clean_records` chains the cleaners lazily (one pass, streaming),
counts what each one kept, rewrote and rejected, and collects the rejects with the
cleaner's name, the reason and the row's file and line. A cleaner that yields fewer
verdicts than it received records is an error: nothing is dropped silently.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from tunesmith.core.errors import ConfigError, TunesmithError
from tunesmith.core.registry import member

#: used when the config lists no cleaners (DESIGN.md)


def default_cleaners(registries: Any) -> list[str]:
    """The cleaners that run when the config lists none: those whose
    ``default_order`` is set, in that order (built in: normalize, length,
    exact_dedupe, near_dedupe, pii, quality)."""
    chain = [(member(c, "cleaners", "default_order"), name) for name, c in registries.cleaners.items()]
    return [name for order, name in sorted(c for c in chain if c[0] is not None)]


@dataclass
class Verdict:
    """What a cleaner decided about one record.

    ``reason`` is None for a kept record; ``code`` is a short category for counting
    (``"near_duplicate"``); ``tags`` counts what a rewriting cleaner changed
    (``{"EMAIL": 2}``).
    """

    record: dict
    reason: str | None = None
    code: str | None = None
    modified: bool = False
    tags: dict[str, int] | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None

    @classmethod
    def keep(cls, record: dict, *, modified: bool = False, tags: dict[str, int] | None = None) -> "Verdict":
        return cls(record, None, None, modified, tags)

    @classmethod
    def reject(cls, record: dict, reason: str, code: str | None = None) -> "Verdict":
        return cls(record, reason, code or reason.split(":")[0].strip().replace(" ", "_")[:40])


# --------------------------------------------------------------------------- shared text helpers
_FOLD_RE = re.compile(r"[\W_]+")


def fold(text: str) -> str:
    """Case, punctuation and whitespace folded: what dedupe compares."""
    return _FOLD_RE.sub(" ", text.lower()).strip()


def dedupe_text(record: dict) -> str:
    """The record's content as one string (roles included), before folding."""
    if "messages" in record:
        return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    if "chosen" in record:
        parts = []
        for k in ("prompt", "chosen", "rejected"):
            parts.append(k + ": " + "\n".join(f"{m['role']}: {m['content']}" for m in record.get(k) or []))
        return "\n".join(parts)
    return record.get("text", "")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------- tokenizer for token-based cleaners
def get_tokenizer(context: Any) -> Any:
    """The tokenizer of the run: ``context.tokenizer``, a path in ``context.state``,
    the config's model, or the default model's tokenizer."""
    tok = getattr(context, "tokenizer", None)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer

    state = getattr(context, "state", None) or {}
    path = state.get("tokenizer_path")
    if path is None:
        cfg = getattr(context, "config", None)
        if cfg is not None:
            path = tokenizer_source_dir(cfg, getattr(context, "registries", None))
    if path is None:
        from tunesmith.core.paths import tokenizer_dir

        path = tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    if context is not None:
        try:
            context.tokenizer = tok
        except AttributeError:
            pass
    return tok


def tokenizer_source_dir(cfg: Any, registries: Any = None) -> Any:
    """Where the config's tokenizer can be read: the model source's own
    ``tokenizer_dir`` when it has one (cheap: no weights are resolved), else the
    resolved model folder."""
    from tunesmith.core.models import resolve_model_dir, source_options

    source, options = source_options(cfg.model, registries, base_dir=getattr(cfg, "base_dir", None))
    cheap = member(source, "model_sources", "tokenizer_dir")
    if cheap is not None:
        found = cheap(options)
        if found is not None:
            return found
    return resolve_model_dir(cfg.model, registries)


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts without special tokens, batched through the fast tokenizer."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return [len(ids) for ids in enc["input_ids"]]


# --------------------------------------------------------------------------- the pipeline
@dataclass
class CleanerStats:
    name: str
    seen: int = 0
    kept: int = 0
    rejected: int = 0
    modified: int = 0
    reasons: Counter = field(default_factory=Counter)
    tags: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "in": self.seen,
            "kept": self.kept,
            "rejected": self.rejected,
            "modified": self.modified,
            "reasons": dict(self.reasons.most_common()),
            "replacements": dict(self.tags.most_common()),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class CleanResult:
    records: list[dict]
    rejects: list[dict]
    stats: list[CleanerStats]
    rows_in: int = 0

    def summary(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "kept": len(self.records),
            "rejected": len(self.rejects),
            "cleaners": [s.as_dict() for s in self.stats],
        }


def resolve_cleaners(cleaners: Any, registries: Any) -> list[tuple[Any, Any]]:
    """``(cleaner, options)`` pairs from config specs, dicts, names, or None (the defaults)."""
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    reg = registries.cleaners
    specs = default_cleaners(registries) if cleaners is None else list(cleaners)
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            name, raw = spec, {}
        elif isinstance(spec, dict):
            raw = dict(spec)
            name = raw.pop("name", None)
            if not name:
                raise ConfigError("a cleaner entry needs a 'name'", key=f"data.cleaners.{i}")
        elif hasattr(spec, "plugin_name"):
            name = spec.plugin_name
            obj = reg.get(name)
            opts = spec._options
            if opts is None and getattr(obj, "Options", None) is not None:
                opts = obj.Options.model_validate(spec.plugin_fields())
            out.append((obj, opts))
            continue
        else:
            raise ConfigError(f"cannot read cleaner entry {spec!r}", key=f"data.cleaners.{i}")
        obj = reg.get(name)
        options_model = getattr(obj, "Options", None)
        if options_model is None:
            opts = None
        else:
            from pydantic import ValidationError

            try:
                opts = options_model.model_validate(raw)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ConfigError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}",
                                  key=f"data.cleaners.{i}") from None
        out.append((obj, opts))
    return out


def _reject_row(name: str, v: Verdict) -> dict:
    meta = v.record.get("metadata") or {}
    row = {"stage": "clean", "cleaner": name, "code": v.code, "reason": v.reason}
    for k in ("source", "line", "row"):
        if k in meta:
            row[k] = meta[k]
    row["record"] = v.record
    return row


def clean_records(
    records: Iterable[dict],
    cleaners: Any = None,
    *,
    registries: Any = None,
    context: Any = None,
    progress: bool = False,
    total: int | None = None,
) -> CleanResult:
    """Run the cleaners in order over canonical records.

    :param cleaners: config ``CleanerSpec`` objects, ``{"name": ..., **options}`` dicts or
        names; ``None`` runs :func:`default_cleaners` with their default options.
    :param context: a :class:`~tunesmith.core.context.RunContext` (the token-length filter
        takes its tokenizer from it); one is made when None.
    :returns: kept records, rejects (one dict per dropped row: cleaner, code, reason,
        source, line, record) and per-cleaner statistics.
    """
    if context is None:
        from tunesmith.core.context import RunContext

        context = RunContext(registries=registries)
    chain = resolve_cleaners(cleaners, registries)
    rejects: list[dict] = []
    stats = [CleanerStats(getattr(c, "name", "?")) for c, _ in chain]
    counter = {"n": 0}

    def source() -> Iterator[dict]:
        it: Iterable[dict] = records
        if progress:
            from tqdm import tqdm

            it = tqdm(records, total=total, desc="cleaning", unit="rows", mininterval=0.5)
        for r in it:
            counter["n"] += 1
            yield r

    stream: Iterator[dict] = source()
    for (cleaner, opts), st in zip(chain, stats):
        stream = _stage(cleaner, opts, context, stream, st, rejects)
    kept = list(stream)
    return CleanResult(kept, rejects, stats, counter["n"])


def _stage(cleaner: Any, opts: Any, context: Any, upstream: Iterator[dict], st: CleanerStats,
           rejects: list[dict]) -> Iterator[dict]:
    pulled = [0.0]  # time spent waiting on upstream stages, not this cleaner's own

    def counted() -> Iterator[dict]:
        it = iter(upstream)
        while True:
            t = time.perf_counter()
            try:
                r = next(it)
            except StopIteration:
                pulled[0] += time.perf_counter() - t
                return
            pulled[0] += time.perf_counter() - t
            st.seen += 1
            yield r

    produced = 0
    active = 0.0
    t0 = time.perf_counter()
    for v in cleaner.apply(counted(), opts, context):
        produced += 1
        if not isinstance(v, Verdict):
            raise TunesmithError(f"cleaner '{st.name}' yielded {type(v).__name__}, expected a Verdict")
        if v.kept:
            st.kept += 1
            if v.modified:
                st.modified += 1
                if v.tags:
                    st.tags.update(v.tags)
            active += time.perf_counter() - t0
            yield v.record
            t0 = time.perf_counter()
        else:
            st.rejected += 1
            st.reasons[v.code or "rejected"] += 1
            rejects.append(_reject_row(st.name, v))
    active += time.perf_counter() - t0
    st.seconds = max(0.0, active - pulled[0])
    if produced != st.seen:
        raise TunesmithError(
            f"cleaner '{st.name}' received {st.seen} records but gave {produced} verdicts: "
            "every record needs a verdict (nothing may be dropped silently)"
        )
