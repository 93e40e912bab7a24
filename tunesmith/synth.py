"""Synthetic data: paraphrase instructions, and new examples from seed examples.

A generator plugin (area ``generators``: ``local`` runs a model through
transformers, ``openai`` calls an OpenAI-compatible endpoint) turns prompts into
texts; this module writes the prompts, parses the answers into canonical chat
records and marks every generated row in its metadata::

    {"metadata": {"synthetic": {"method": "paraphrase" | "seeds", "generator": "local",
                                "parents": ["seeds.jsonl:3", ...]}}}

The rows then go through the cleaners like any other (:func:`synthesize` does
this), so a generator's duplicates, empty answers and PII are rejected or
scrubbed the same way a person's would be.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from tunesmith.core.errors import DataError, TunesmithError

PARAPHRASE_PROMPT = (
    "Rewrite the following request so it asks for exactly the same thing in different words. "
    "Keep every name, number and detail. Reply with the rewritten request only.\n\n"
    "Request: {text}"
)

SEED_PROMPT = (
    "Here are examples of instructions and their responses.\n\n{examples}\n\n"
    "Write one new example of the same kind, on a different topic. Use exactly this layout:\n"
    "### Instruction\n<the instruction>\n### Response\n<the response>"
)

_PREFIX = re.compile(r"^\s*(?:rewritten request|request|paraphrase|rewritten|sure[^:\n]*)\s*:\s*", re.IGNORECASE)


@dataclass
class SynthResult:
    records: list[dict]
    failures: list[dict] = field(default_factory=list)  # generated text that could not be parsed
    prompts: int = 0

    def summary(self) -> dict:
        return {"prompts": self.prompts, "generated": len(self.records), "unparsed": len(self.failures)}


def _user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise DataError("a chat record without a user turn cannot be paraphrased")


def _where(record: dict) -> str:
    from tunesmith.core.data import where

    return where(record)


def _mark(record: dict, method: str, generator: str, parents: list[str]) -> dict:
    meta = {k: v for k, v in (record.get("metadata") or {}).items() if k not in ("source", "line", "row")}
    meta["synthetic"] = {"method": method, "generator": generator, "parents": parents}
    record["metadata"] = meta
    return record


def clean_generated(text: str) -> str:
    """Strip what models wrap answers in: labels ("Rewritten request:"), quotes, trailing turns."""
    t = (text or "").strip()
    t = _PREFIX.sub("", t, count=1).strip()
    # a model that goes on to answer or to write a second item: keep the first block
    t = re.split(r"\n\s*\n|\n(?:###|Request:|Response:)", t, maxsplit=1)[0].strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t


def _run(generator: Any, prompts: list[str], options: Any, context: Any) -> list[str]:
    out = generator.generate(prompts, options, context)
    if not isinstance(out, list) or len(out) != len(prompts):
        raise TunesmithError(
            f"generator '{getattr(generator, 'name', '?')}' returned {len(out) if isinstance(out, list) else type(out).__name__}"
            f" texts for {len(prompts)} prompts"
        )
    return [o if isinstance(o, str) else "" for o in out]


def paraphrase_records(
    records: Iterable[dict],
    generator: Any,
    options: Any = None,
    *,
    n: int = 1,
    context: Any = None,
    template: str = PARAPHRASE_PROMPT,
) -> SynthResult:
    """``n`` paraphrases of the last user turn of each chat record; the answer is kept.

    Paraphrases that come back empty or identical to the original are reported in
    ``failures`` rather than written.
    """
    from tunesmith.core.data import record_kind

    recs = [r for r in records]
    jobs: list[tuple[dict, int]] = []
    prompts: list[str] = []
    for r in recs:
        if record_kind(r) != "chat":
            raise DataError("paraphrasing needs chat records (instruction/response)", path=_where(r))
        ui = _user_index(r["messages"])
        for _ in range(n):
            jobs.append((r, ui))
            prompts.append(template.format(text=r["messages"][ui]["content"]))
    texts = _run(generator, prompts, options, context) if prompts else []
    out: list[dict] = []
    failures: list[dict] = []
    name = getattr(generator, "name", "?")
    for (r, ui), raw in zip(jobs, texts):
        text = clean_generated(raw)
        original = r["messages"][ui]["content"]
        if not text or text.strip().lower() == original.strip().lower():
            failures.append({"parent": _where(r), "reason": "empty" if not text else "identical to the original", "output": raw})
            continue
        new = copy.deepcopy(r)
        new["messages"][ui]["content"] = text
        out.append(_mark(new, "paraphrase", name, [_where(r)]))
    return SynthResult(out, failures, len(prompts))


def _example_block(record: dict) -> str:
    msgs = record["messages"]
    ui = _user_index(msgs)
    answer = next((m["content"] for m in msgs[ui + 1:] if m["role"] == "assistant"), "")
    return f"### Instruction\n{msgs[ui]['content']}\n### Response\n{answer}"


_LAYOUT = re.compile(r"###\s*Instruction\s*\n(?P<i>.*?)\n\s*###\s*Response\s*\n(?P<r>.*?)(?:\n\s*###|\Z)", re.S | re.I)


def parse_example(text: str) -> tuple[str, str] | None:
    """(instruction, response) from a generated ``### Instruction / ### Response`` block."""
    m = _LAYOUT.search(text or "")
    if not m:
        return None
    ins, resp = m.group("i").strip(), m.group("r").strip()
    if not ins or not resp:
        return None
    return ins, resp


def generate_from_seeds(
    seeds: Iterable[dict],
    generator: Any,
    options: Any = None,
    *,
    n: int = 10,
    shots: int = 3,
    seed: int = 42,
    context: Any = None,
    template: str = SEED_PROMPT,
) -> SynthResult:
    """``n`` new chat examples, each prompted with ``shots`` seed examples drawn at random."""
    from tunesmith.core.data import record_kind

    pool = [r for r in seeds]
    if not pool:
        raise DataError("no seed examples")
    for r in pool:
        if record_kind(r) != "chat":
            raise DataError("seeds must be chat records (instruction/response)", path=_where(r))
    rng = random.Random(seed)
    k = max(1, min(shots, len(pool)))
    picks = [rng.sample(pool, k) for _ in range(n)]
    prompts = [template.format(examples="\n\n".join(_example_block(r) for r in p)) for p in picks]
    texts = _run(generator, prompts, options, context) if prompts else []
    name = getattr(generator, "name", "?")
    out, failures = [], []
    for p, raw in zip(picks, texts):
        parsed = parse_example(raw)
        parents = [_where(r) for r in p]
        if parsed is None:
            failures.append({"parents": parents, "reason": "no '### Instruction / ### Response' block", "output": raw})
            continue
        system = [m for m in p[0]["messages"] if m["role"] == "system"][:1]
        rec = {"messages": [*copy.deepcopy(system), {"role": "user", "content": parsed[0]},
                            {"role": "assistant", "content": parsed[1]}], "metadata": {}}
        out.append(_mark(rec, "seeds", name, parents))
    return SynthResult(out, failures, len(prompts))


def synthesize(
    records: list[dict],
    *,
    mode: str,
    generator: str | Any = "local",
    options: dict | Any = None,
    n: int = 1,
    shots: int = 3,
    seed: int = 42,
    cleaners: Any = None,
    include_originals: bool = False,
    registries: Any = None,
    context: Any = None,
) -> dict:
    """Generate (``mode`` = ``paraphrase`` or ``seeds``), then run the cleaners over the result.

    :param generator: a generator name from the registry, or a generator object.
    :param options: the generator's options (a dict is validated with its ``Options``).
    :param cleaners: as for :func:`tunesmith.core.data_clean.clean_records` (None: the defaults).
    :param include_originals: clean the originals together with the new rows, so
        a paraphrase that duplicates an original is caught by dedupe.
    :returns: ``{"records", "rejects", "failures", "summary"}``.
    """
    from tunesmith.core.context import RunContext
    from tunesmith.core.data_clean import clean_records

    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    gen = registries.generators.get(generator) if isinstance(generator, str) else generator
    opts = validate_generator_options(gen, options)
    context = context or RunContext(registries=registries)
    if mode == "paraphrase":
        res = paraphrase_records(records, gen, opts, n=n, context=context)
    elif mode == "seeds":
        res = generate_from_seeds(records, gen, opts, n=n, shots=shots, seed=seed, context=context)
    else:
        raise TunesmithError(f"unknown synthesis mode '{mode}'", hint="paraphrase or seeds")
    pool = (list(records) if include_originals else []) + res.records
    cleaned = clean_records(pool, cleaners, registries=registries, context=context)
    kept = cleaned.records if include_originals else [r for r in cleaned.records if "synthetic" in (r.get("metadata") or {})]
    summary = {**res.summary(), "kept": len([r for r in kept if "synthetic" in (r.get("metadata") or {})]),
               "rejected": len([x for x in cleaned.rejects if "synthetic" in ((x.get("record") or {}).get("metadata") or {})]),
               "cleaning": cleaned.summary()}
    return {"records": kept, "rejects": cleaned.rejects, "failures": res.failures, "summary": summary}


def validate_generator_options(gen: Any, options: Any) -> Any:
    model = getattr(gen, "Options", None)
    if model is None or (options is not None and not isinstance(options, dict)):
        return options
    from pydantic import ValidationError

    try:
        return model.model_validate(options or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise TunesmithError(f"generator '{gen.name}': {key}: {first['msg']}") from None
