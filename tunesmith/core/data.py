"""Data: loading, format detection, canonical records, conversion and writing.

Canonical records (what every other stage consumes):

* chat  ``{"messages": [{"role": "system|user|assistant|tool", "content": str}], "metadata": {...}}``
* pairs ``{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs], "metadata": {...}}``
* text  ``{"text": str, "metadata": {...}}``

``metadata`` always holds ``source`` (the file) and ``line`` (1-based, JSONL/JSON/CSV)
or ``row`` (1-based, Parquet/``datasets`` folders), plus any extra fields of the
input row, so rejects and reports can say where a row came from.

Bad input (malformed JSON, wrong types, missing fields, bytes that are not UTF-8,
an empty file) raises :class:`~tunesmith.core.errors.DataError` naming the file and
line. With ``skip_invalid=True`` the row goes to ``rejects`` (a list of dicts with
``stage``, ``source``, ``line``/``row``, ``reason`` and the raw row) instead.

Cleaning, reports, splits, mixing and chunking build on this module and live in
``data_clean``, ``data_report`` and ``data_ops`` (this module imports none of
them: the data modules form no cycle).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith.core.errors import DataError
from tunesmith.core.registry import member

log = logging.getLogger("tunesmith.data")

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("chat", "pairs", "text")
#: metadata keys tunesmith sets itself (not written back as user fields)
LOCATION_KEYS = ("source", "line", "row")
DETECT_ROWS = 200
TEXT_SUFFIXES = (".txt", ".text", ".md")


# --------------------------------------------------------------------------- helpers for format plugins
def check_messages(value: Any, field: str, *, roles: tuple[str, ...] = ROLES) -> list[str]:
    """Problems with a list of ``{"role", "content"}`` messages (empty when valid)."""
    if not isinstance(value, list):
        return [f"'{field}' must be a list of messages, got {_tname(value)}"]
    if not value:
        return [f"'{field}' is an empty list"]
    problems = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            problems.append(f"'{field}[{i}]' must be an object with role and content, got {_tname(m)}")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            problems.append(f"'{field}[{i}].role' must be one of {', '.join(roles)}, got {role!r}")
        if not isinstance(content, str):
            problems.append(f"'{field}[{i}].content' must be a string, got {_tname(content)}")
    return problems


def check_str(row: dict, field: str, *, required: bool = True) -> list[str]:
    if field not in row or row[field] is None:
        return [f"missing field '{field}'"] if required else []
    if not isinstance(row[field], str):
        return [f"'{field}' must be a string, got {_tname(row[field])}"]
    return []


def _tname(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def clean_messages(msgs: list[dict]) -> list[dict]:
    """Only role and content, in that order."""
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def record_kind(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "chosen" in record and "rejected" in record:
        return "pairs"
    if "text" in record:
        return "text"
    raise DataError(f"not a canonical record (keys: {', '.join(sorted(record))})")


def user_metadata(record: dict) -> dict:
    """The record's metadata without the location keys tunesmith adds."""
    return {k: v for k, v in (record.get("metadata") or {}).items() if k not in LOCATION_KEYS}


def where(record_or_meta: dict) -> str:
    """``file:line`` (or ``file row N``) of a record, for messages."""
    meta = record_or_meta.get("metadata", record_or_meta) or {}
    src = meta.get("source", "<data>")
    if meta.get("line") is not None:
        return f"{src}:{meta['line']}"
    if meta.get("row") is not None:
        return f"{src} row {meta['row']}"
    return str(src)


# --------------------------------------------------------------------------- text views used by cleaners
def record_texts(record: dict) -> list[str]:
    """Every piece of text of a record, in order."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    if "chosen" in record:
        return [m["content"] for k in ("prompt", "chosen", "rejected") for m in record.get(k) or []]
    return [record.get("text", "")]


def prompt_text(record: dict) -> str:
    """What the model reads (system/user turns; the prompt of a pair; '' for raw text)."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] != "assistant")
    if "chosen" in record:
        return "\n".join(m["content"] for m in record.get("prompt") or [])
    return ""


def completion_text(record: dict) -> str:
    """What the model learns to write (assistant turns; the chosen answer; the raw text)."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
    if "chosen" in record:
        return "\n".join(m["content"] for m in record["chosen"])
    return record.get("text", "")


def full_text(record: dict) -> str:
    return "\n".join(record_texts(record))


def map_texts(record: dict, fn: Any) -> dict:
    """A copy of the record with ``fn`` applied to every text; the same object if nothing changed."""
    changed = False

    def msgs(lst: list[dict]) -> list[dict]:
        nonlocal changed
        out = []
        for m in lst:
            c = fn(m["content"])
            if c != m["content"]:
                changed = True
                m = {**m, "content": c}
            out.append(m)
        return out

    if "messages" in record:
        new = {**record, "messages": msgs(record["messages"])}
    elif "chosen" in record:
        new = {**record, **{k: msgs(record.get(k) or []) for k in ("prompt", "chosen", "rejected")}}
    else:
        t = fn(record.get("text", ""))
        changed = t != record.get("text", "")
        new = {**record, "text": t}
    return new if changed else record


# --------------------------------------------------------------------------- reading raw rows
@dataclass
class RawRow:
    """One input row (or the reason it could not be read) and where it came from."""

    loc: dict  # {"source": str, "line": int} or {"source": str, "row": int}
    row: Any = None
    error: str | None = None
    raw: Any = None  # the text of the line when it did not parse


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".jsonl.gz", ".json.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def iter_raw_rows(path: str | Path, *, text_unit: str = "paragraph") -> Iterator[RawRow]:
    """Rows of a JSONL / JSON / CSV / Parquet / .txt file or a ``datasets`` folder, streamed."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=str(p))
    if p.is_dir():
        if is_datasets_dir(p):
            yield from _iter_datasets(p)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(
                "folder holds no data files (and is not a `datasets` save_to_disk folder)",
                path=str(p),
                hint="expected " + ", ".join(SUPPORTED_SUFFIXES),
            )
        for f in files:
            yield from iter_raw_rows(f, text_unit=text_unit)
        return
    suffix = _suffix(p)
    if p.stat().st_size == 0:
        raise DataError("empty file", path=str(p))
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(
            f"unsupported file type '{suffix or p.name}'",
            path=str(p),
            hint="use .jsonl, .json, .csv, .parquet, .txt or a `datasets` folder",
        )
    if suffix in TEXT_SUFFIXES:
        yield from _iter_txt(p, text_unit)
    else:
        yield from reader(p)


def _open_bytes(p: Path) -> Any:
    if p.name.lower().endswith(".gz"):
        import gzip

        return gzip.open(p, "rb")
    return open(p, "rb")


def _iter_jsonl(p: Path) -> Iterator[RawRow]:
    src = str(p)
    seen = False
    with _open_bytes(p) as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow({"source": src, "line": n}, error=f"bytes that are not UTF-8 (byte {exc.start + 1} of the line)",
                             raw=raw.decode("utf-8", "replace").rstrip("\r\n"))
                seen = True
                continue
            if not line.strip():
                continue
            seen = True
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow({"source": src, "line": n}, error=f"malformed JSON: {exc.msg} (column {exc.colno})",
                             raw=line.rstrip("\r\n"))
                continue
            yield RawRow({"source": src, "line": n}, row=row)
    if not seen:
        raise DataError("empty file (only blank lines)", path=src)


def _read_text(p: Path) -> str:
    with _open_bytes(p) as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"bytes that are not UTF-8 (byte {exc.start + 1} of the file)", path=str(p), line=line) from None


def _iter_json(p: Path) -> Iterator[RawRow]:
    """A JSON array of objects (or ``{"data": [...]}``), decoded element by element for line numbers."""
    src = str(p)
    text = _read_text(p)
    if not text.strip():
        raise DataError("empty file", path=src)
    dec = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    i = _skip_ws(text, 0)
    if text[i] == "{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=src, line=exc.lineno) from None
        for key in ("data", "rows", "examples", "train"):
            if isinstance(obj.get(key), list):
                for n, row in enumerate(obj[key], 1):
                    yield RawRow({"source": src, "row": n}, row=row)
                return
        yield RawRow({"source": src, "line": 1}, row=obj)
        return
    if text[i] != "[":
        raise DataError("a JSON file must hold an array of objects", path=src, line=line_of(i),
                        hint="for one object per line use .jsonl")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        raise DataError("empty file (an empty JSON array)", path=src)
    while i < len(text):
        try:
            row, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=src, line=exc.lineno) from None
        yield RawRow({"source": src, "line": line_of(i)}, row=row)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if _skip_ws(text, i + 1) < len(text):
                raise DataError("unexpected text after the JSON array", path=src, line=line_of(i + 1))
            return
        raise DataError("malformed JSON: expected ',' or ']'", path=src, line=line_of(i))
    raise DataError("malformed JSON: the array is not closed", path=src, line=line_of(len(text)))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


_JSON_COLUMNS = ("messages", "conversations", "prompt", "chosen", "rejected", "metadata")


def _decode_cell(key: str, value: Any) -> Any:
    """CSV/Parquet cells that hold JSON (messages, metadata) are decoded."""
    if key in _JSON_COLUMNS and isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _iter_csv(p: Path) -> Iterator[RawRow]:
    src = str(p)
    text = _read_text(p)
    if not text.strip():
        raise DataError("empty file", path=src)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", path=src, line=1) from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError("the CSV header row is empty", path=src, line=1)
    rows = 0
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield RawRow({"source": src, "line": start}, error=f"malformed CSV: {exc}")
            continue
        if not cells or not any(c.strip() for c in cells):
            continue
        rows += 1
        if len(cells) != len(header):
            yield RawRow({"source": src, "line": start},
                         error=f"{len(cells)} cells but the header has {len(header)} columns", raw=cells)
            continue
        yield RawRow({"source": src, "line": start}, row={h: _decode_cell(h, c) for h, c in zip(header, cells)})
    if rows == 0:
        raise DataError("no rows after the CSV header", path=src)


def _iter_parquet(p: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    src = str(p)
    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise DataError(f"not a readable Parquet file: {exc}", path=src) from None
    if pf.metadata.num_rows == 0:
        raise DataError("empty file (no rows)", path=src)
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield RawRow({"source": src, "row": n}, row={k: _decode_cell(k, v) for k, v in row.items()})


def _iter_datasets(p: Path) -> Iterator[RawRow]:
    import datasets

    src = str(p)
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"not a readable `datasets` folder: {exc}", path=src) from None
    parts = list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    total = 0
    for split, d in parts:
        for n, row in enumerate(d, 1):
            total += 1
            loc = {"source": src, "row": n}
            if split is not None:
                loc["split"] = split
            yield RawRow(loc, row={k: _decode_cell(k, v) for k, v in row.items()})
    if total == 0:
        raise DataError("empty data set (no rows)", path=src)


def _iter_txt(p: Path, unit: str) -> Iterator[RawRow]:
    src = str(p)
    text = _read_text(p)
    if not text.strip():
        raise DataError("empty file", path=src)
    if unit == "file":
        yield RawRow({"source": src, "line": 1}, row={"text": text})
        return
    lines = text.splitlines()
    if unit == "line":
        for n, line in enumerate(lines, 1):
            if line.strip():
                yield RawRow({"source": src, "line": n}, row={"text": line})
        return
    # paragraphs: blocks separated by blank lines
    block: list[str] = []
    start = 1
    for n, line in enumerate(lines + [""], 1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield RawRow({"source": src, "line": start}, row={"text": "\n".join(block)})
            block = []


_READERS = {
    ".jsonl": _iter_jsonl,
    ".ndjson": _iter_jsonl,
    ".jsonl.gz": _iter_jsonl,
    ".json": _iter_json,
    ".json.gz": _iter_json,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
    ".pq": _iter_parquet,
    **{s: _iter_txt for s in TEXT_SUFFIXES},
}
SUPPORTED_SUFFIXES = tuple(_READERS)


# --------------------------------------------------------------------------- formats
def _formats(registries: Any) -> Any:
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    return registries.data_formats


def get_format(name: str, registries: Any = None) -> Any:
    return _formats(registries).get(name)


def _describe_formats(reg: Any) -> str:
    parts = []
    for name, fmt in reg.items():
        fields = member(fmt, "data_formats", "fields_hint") or ", ".join(member(fmt, "data_formats", "fields") or ())
        parts.append(f"{name} ({fields})" if fields else name)
    return "; ".join(parts)


def detect_format(rows: Iterable[Any], *, registries: Any = None, source: str = "<data>") -> Any:
    """The format plugin whose ``detect`` accepts the rows; a clear error when none or several do."""
    reg = _formats(registries)
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        raise DataError("no JSON objects to detect a format from", path=source)
    counts: dict[str, int] = {}
    for name, fmt in reg.items():
        c = 0
        for r in rows:
            try:
                c += bool(fmt.detect(r))
            except Exception:  # noqa: BLE001 - a plugin's detect must not crash loading
                pass
        if c:
            counts[name] = c
    seen = sorted({k for r in rows for k in r})
    if not counts:
        raise DataError(
            f"unknown format: fields seen: {', '.join(seen) or '(none)'}; expected one of: {_describe_formats(reg)}",
            path=source,
            hint="pass --format NAME (or data.format) to choose one",
        )
    best = max(counts.values())
    top = sorted(n for n, c in counts.items() if c == best)
    if len(top) > 1:
        raise DataError(
            f"ambiguous format: rows match {', '.join(top)} (fields seen: {', '.join(seen)})",
            path=source,
            hint="pass --format NAME (or data.format) to choose one",
        )
    return reg.get(top[0])


def to_canonical(row: dict, fmt: Any, loc: dict | None = None) -> dict:
    """A row of ``fmt`` as a canonical record, extra fields kept in ``metadata``."""
    rec = fmt.to_canonical(row)
    meta: dict = {}
    if isinstance(row.get("metadata"), dict):
        meta.update(row["metadata"])
    known = set(member(fmt, "data_formats", "fields") or ()) | {"metadata"}
    if member(fmt, "data_formats", "fields"):
        for k, v in row.items():
            if k not in known:
                meta[k] = v
    meta.update(rec.get("metadata") or {})
    if loc:
        meta.update(loc)
    rec["metadata"] = meta
    return rec


def iter_records(
    path: str | Path,
    *,
    format: str = "auto",
    registries: Any = None,
    skip_invalid: bool = False,
    rejects: list | None = None,
    text_unit: str = "paragraph",
) -> Iterator[dict]:
    """Stream canonical records from a file or folder (see :func:`load_records`)."""
    src = str(path)
    stream = iter_raw_rows(path, text_unit=text_unit)

    def fail(loc: dict, reason: str, raw: Any) -> None:
        if skip_invalid:
            if rejects is not None:
                rejects.append({"stage": "load", "reason": reason, **loc, "raw": raw})
                log.debug("%s: %s (skipped)", where(loc), reason)
            else:
                log.warning("%s: %s (skipped)", where(loc), reason)
            return
        if "line" in loc:
            raise DataError(reason, path=loc["source"], line=loc["line"])
        raise DataError(f"row {loc.get('row')}: {reason}", path=loc["source"])

    if format == "auto":
        if Path(path).is_file() and _suffix(Path(path)) in TEXT_SUFFIXES:
            fmt = get_format("text", registries)
            buffer: list[RawRow] = []
        else:
            buffer = []
            for rr in stream:
                buffer.append(rr)
                if len(buffer) >= DETECT_ROWS:
                    break
            good = [b.row for b in buffer if b.error is None and isinstance(b.row, dict)]
            if not good:
                bad = next((b for b in buffer if b.error is not None), None)
                if bad is not None and not skip_invalid:
                    fail(bad.loc, bad.error, bad.raw)
                first = bad.error if bad is not None else "no row is a JSON object"
                raise DataError(f"no valid rows to detect the format from (first problem: {first})", path=src)
            fmt = detect_format(good, registries=registries, source=src)
    else:
        fmt = get_format(format, registries)
        buffer = []

    def rows() -> Iterator[RawRow]:
        yield from buffer
        yield from stream

    name = getattr(fmt, "name", "?")
    for rr in rows():
        if rr.error is not None:
            fail(rr.loc, rr.error, rr.raw)
            continue
        row = rr.row
        if not isinstance(row, dict):
            fail(rr.loc, f"expected a JSON object, got {_tname(row)}", row)
            continue
        validate = member(fmt, "data_formats", "validate")
        problems = list(validate(row)) if validate else []
        if problems:
            fail(rr.loc, f"invalid {name} row: " + "; ".join(problems), row)
            continue
        try:
            rec = to_canonical(row, fmt, rr.loc)
        except (KeyError, TypeError, ValueError, DataError) as exc:
            fail(rr.loc, f"cannot read as {name}: {exc}", row)
            continue
        yield rec


def load_records(
    path: str | Path,
    *,
    format: str = "auto",
    registries: Any = None,
    skip_invalid: bool = False,
    rejects: list | None = None,
    text_unit: str = "paragraph",
) -> list[dict]:
    """Canonical records of a JSONL/JSON/CSV/Parquet/.txt file, a folder of them or a ``datasets`` folder.

    :param format: a data-format plugin name, or ``"auto"`` to detect it from the rows.
    :param skip_invalid: put bad rows in ``rejects`` instead of raising :class:`DataError`.
    :param rejects: a list that receives one dict per skipped row.
    :param text_unit: how .txt files become records: ``paragraph`` (blank-line separated),
        ``line`` or ``file``.
    """
    return list(iter_records(path, format=format, registries=registries, skip_invalid=skip_invalid,
                             rejects=rejects, text_unit=text_unit))


def kind_of(records: list[dict]) -> str | None:
    """The kind shared by all records; error if they differ."""
    kinds = {record_kind(r) for r in records}
    if len(kinds) > 1:
        raise DataError(f"records of different kinds cannot be mixed: {', '.join(sorted(kinds))}")
    return kinds.pop() if kinds else None


# --------------------------------------------------------------------------- conversion and writing
def from_canonical(record: dict, fmt: Any) -> dict:
    """A canonical record as a row of ``fmt``; user metadata kept under ``metadata``."""
    needed = member(fmt, "data_formats", "kind")
    have = record_kind(record)
    if needed and needed != have:
        raise DataError(f"{where(record)}: a {have} record cannot be written as {fmt.name} ({needed} records only)")
    try:
        row = fmt.from_canonical(record)
    except DataError as exc:
        raise DataError(f"{where(record)}: {exc}") from None
    meta = user_metadata(record)
    if meta and "metadata" not in row:
        row["metadata"] = meta
    return row


def convert_records(records: Iterable[dict], to: str, *, registries: Any = None) -> Iterator[dict]:
    fmt = get_format(to, registries)
    for r in records:
        yield from_canonical(r, fmt)


def _strip_location(record: dict, keep_location: bool) -> dict:
    if keep_location or "metadata" not in record:
        return record
    return {**record, "metadata": user_metadata(record)}


def write_records(
    records: Iterable[dict],
    path: str | Path,
    *,
    format: str | None = None,
    registries: Any = None,
    keep_location: bool = True,
) -> Path:
    """Write records atomically as JSONL, JSON or Parquet (by suffix).

    :param format: convert canonical records to this data format first; ``None`` writes
        them canonical.
    :param keep_location: keep ``source``/``line`` in each record's metadata.
    """
    from tunesmith.core.io import atomic_open, atomic_write_bytes

    p = Path(path)
    if format:
        rows: Iterable[dict] = convert_records(records, format, registries=registries)
    else:
        rows = (_strip_location(r, keep_location) for r in records)
    suffix = _suffix(p)
    if suffix in (".jsonl", ".ndjson", ""):
        with atomic_open(p, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False, default=str))
                fh.write("\n")
    elif suffix == ".json":
        with atomic_open(p, "w") as fh:
            fh.write("[\n")
            for i, r in enumerate(rows):
                if i:
                    fh.write(",\n")
                fh.write(json.dumps(r, ensure_ascii=False, default=str))
            fh.write("\n]\n")
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        # nested columns whose shape varies row to row (metadata) are stored as JSON text
        flat = []
        for r in rows:
            flat.append({k: (json.dumps(v, ensure_ascii=False, default=str) if k == "metadata" else v) for k, v in r.items()})
        table = pa.Table.from_pylist(flat)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(p, sink.getvalue().to_pybytes())
    else:
        raise DataError(f"cannot write '{suffix}' files", path=str(p), hint="use .jsonl, .json or .parquet")
    return p
