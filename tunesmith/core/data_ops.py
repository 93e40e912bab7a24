"""Splits, mixing, replay, chunking, and :func:`prepare_data` (the pipeline's data stage).

Order in :func:`prepare_data`: load every source -> clean them together (so dedupe
works across sources and before the split: no duplicate crosses it) -> split ->
mix the training part by the configured strategy -> add replay data to the
training part -> write files and the report.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from tunesmith.core.data import load_records, record_kind, write_records
from tunesmith.core.errors import ConfigError, DataError

log = logging.getLogger("tunesmith.data")
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- split
def split_records(
    records: Sequence[dict],
    *,
    train: float = 0.8,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 42,
    stratify: str | None = None,
    split: Any = None,
) -> dict[str, list[dict]]:
    """Deterministic train/validation/test split by ratios and seed.

    :param stratify: a metadata field; each of its values is split by the ratios on its
        own, so every split keeps the field's proportions.
    :param split: a config ``SplitSection`` (overrides the ratio arguments).
    Records keep their input order within each split.
    """
    if split is not None:
        train, validation, test, seed, stratify = split.train, split.validation, split.test, split.seed, split.stratify
    ratios = {"train": train, "validation": validation, "test": test}
    if any(v < 0 for v in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise ConfigError(f"split ratios must be >= 0 and sum to 1, got {ratios}", key="data.split")
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        key = (r.get("metadata") or {}).get(stratify) if stratify else None
        if stratify and key is None:
            key = "<missing>"
        groups[str(key) if stratify else None].append(i)
    keys = sorted(groups, key=lambda k: (k is None, str(k)))
    # whole-split counts by the ratios; strata share them by largest remainder, so a
    # stratified split has the same sizes as a plain one
    n_val = _apportion({k: len(groups[k]) for k in keys}, validation, int(round(len(records) * validation)))
    room = {k: len(groups[k]) - n_val[k] for k in keys}
    n_test = _apportion({k: len(groups[k]) for k in keys}, test, int(round(len(records) * test)), cap=room)
    assign: dict[int, str] = {}
    rng = random.Random(seed)
    for key in keys:
        idx = list(groups[key])
        rng.shuffle(idx)
        v, t = n_val[key], n_test[key]
        for j, i in enumerate(idx):
            assign[i] = "validation" if j < v else ("test" if j < v + t else "train")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        out[assign[i]].append(r)
    return out


def _apportion(sizes: dict, ratio: float, total: int, cap: dict | None = None) -> dict:
    """Integer shares of ``total`` proportional to ``sizes`` (largest remainder, capped)."""
    cap = cap or sizes
    exact = {k: n * ratio for k, n in sizes.items()}
    out = {k: min(int(math.floor(v)), cap[k]) for k, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(sizes, key=lambda k: -(exact[k] - math.floor(exact[k])))
    while left > 0:
        moved = False
        for k in order:
            if left and out[k] < cap[k]:
                out[k] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return out


def cross_split_duplicates(splits: dict[str, list[dict]]) -> int:
    """Rows whose folded content also appears in another split (0 after dedupe)."""
    from tunesmith.core.data_clean import dedupe_text, fold

    where: dict[bytes, str] = {}
    dup = 0
    for name, rows in splits.items():
        seen_here: set[bytes] = set()
        for r in rows:
            k = hashlib.blake2b(fold(dedupe_text(r)).encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if k in seen_here:
                continue
            seen_here.add(k)
            other = where.get(k)
            if other is not None and other != name:
                dup += 1
            else:
                where[k] = name
    return dup


# --------------------------------------------------------------------------- mixing and replay
def _sample(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` rows: without replacement while possible, whole repeats beyond the size."""
    n = len(records)
    if n == 0 or count <= 0:
        return []
    out: list[dict] = []
    while count >= n:
        out += records
        count -= n
    out += rng.sample(records, count)
    return out


def mix_counts(sizes: Sequence[int], weights: Sequence[float], strategy: str, temperature: float = 2.0) -> list[int]:
    """Rows drawn from each source.

    * proportional: ``weight x size`` (weight 1 keeps a source whole, 0.5 halves it, 2 doubles it);
    * equal: ``weight x min(size)`` from each source;
    * temperature: the total stays ``sum(size)``, shared ``p_i ∝ (weight_i x size_i)^(1/T)``.
    """
    if strategy == "proportional":
        return [int(round(w * n)) for n, w in zip(sizes, weights)]
    if strategy == "equal":
        m = min(sizes) if sizes else 0
        return [int(round(w * m)) for w in weights]
    if strategy == "temperature":
        if temperature <= 0:
            raise ConfigError("mixing temperature must be > 0", key="data.mixing.temperature")
        mass = [(w * n) ** (1.0 / temperature) if n else 0.0 for n, w in zip(sizes, weights)]
        total = sum(sizes)
        z = sum(mass) or 1.0
        return [int(round(total * m / z)) for m in mass]
    raise ConfigError(f"unknown mixing strategy '{strategy}'", key="data.mixing.strategy",
                      hint="proportional, equal or temperature")


def mix_sources(
    sources: Sequence[dict],
    *,
    strategy: str = "proportional",
    temperature: float = 2.0,
    seed: int = 42,
) -> tuple[list[dict], dict]:
    """Mix several data sets into one shuffled list.

    :param sources: ``[{"name": str, "records": [...], "weight": float | None}, ...]``.
    :returns: ``(records, summary)``; each record's metadata gets ``mix_source``.
    """
    if not sources:
        return [], {"strategy": strategy, "sources": []}
    kinds = {record_kind(s["records"][0]) for s in sources if s["records"]}
    if len(kinds) > 1:
        raise DataError("cannot mix sources of different kinds: " + ", ".join(
            f"{s['name']} ({record_kind(s['records'][0])})" for s in sources if s["records"]))
    sizes = [len(s["records"]) for s in sources]
    weights = [1.0 if s.get("weight") is None else float(s["weight"]) for s in sources]
    if any(w < 0 for w in weights):
        raise ConfigError("source weights must be >= 0", key="data.sources")
    counts = mix_counts(sizes, weights, strategy, temperature)
    rng = random.Random(seed)
    out: list[dict] = []
    summary = {"strategy": strategy, "sources": []}
    if strategy == "temperature":
        summary["temperature"] = temperature
    for s, n, w, c in zip(sources, sizes, weights, counts):
        picked = _sample(list(s["records"]), c, rng)
        for r in picked:
            out.append({**r, "metadata": {**(r.get("metadata") or {}), "mix_source": s["name"]}})
        summary["sources"].append({"name": s["name"], "size": n, "weight": w, "drawn": c,
                                   "repeats": max(0, c - n)})
    rng.shuffle(out)
    total = len(out) or 1
    for entry in summary["sources"]:
        entry["share"] = round(entry["drawn"] / total, 4)
    return out, summary


def add_replay(train: list[dict], replay: list[dict], ratio: float, *, seed: int = 42) -> tuple[list[dict], dict]:
    """Mix general data into ``train`` so it makes up ``ratio`` of the result (against forgetting)."""
    if not 0 <= ratio < 1:
        raise ConfigError("replay ratio must be in [0, 1)", key="data.replay.ratio")
    want = int(round(ratio / (1 - ratio) * len(train)))
    rng = random.Random(seed)
    picked = _sample(list(replay), want, rng) if replay else []
    tagged = [{**r, "metadata": {**(r.get("metadata") or {}), "replay": True}} for r in picked]
    out = list(train) + tagged
    rng.shuffle(out)
    return out, {"ratio": ratio, "rows": len(tagged), "available": len(replay),
                 "repeats": max(0, len(tagged) - len(replay))}


# --------------------------------------------------------------------------- chunking
def chunk_texts(
    texts: Iterable[Any],
    tokenizer: Any,
    *,
    chunk_size: int = 2048,
    overlap: int = 0,
    pack: bool = True,
    drop_last: bool = False,
    add_eos: bool = True,
    batch_size: int = 256,
) -> list[dict]:
    """Split raw text into chunks of ``chunk_size`` tokens of the real tokenizer.

    :param texts: strings or text records.
    :param pack: concatenate documents (an EOS token between them) before cutting, so
        every chunk but the last is full; otherwise each document is cut on its own.
    :param overlap: tokens shared by consecutive chunks.
    :returns: records ``{"text", "input_ids", "metadata": {"chunk", "n_tokens", "source"...}}``;
        ``input_ids`` are authoritative (``text`` is their decoding).
    """
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise ConfigError("need chunk_size >= 1 and 0 <= overlap < chunk_size")
    stride = chunk_size - overlap
    items = [({"text": t, "metadata": {}} if isinstance(t, str) else t) for t in texts]
    for r in items:
        if not isinstance(r.get("text"), str):
            from tunesmith.core.data import where

            raise DataError(f"{where(r)}: chunking needs raw text records, got {record_kind(r)}")
    eos = tokenizer.eos_token_id if add_eos else None
    out: list[dict] = []

    def emit(ids: list[int], meta: dict) -> None:
        out.append({"text": tokenizer.decode(ids), "input_ids": ids,
                    "metadata": {**meta, "chunk": len(out), "n_tokens": len(ids)}})

    def windows(buf: list[int], meta: dict, final: bool) -> list[int]:
        """Emit every full window; at the end also the partial tail (unless drop_last)."""
        emitted = False
        while len(buf) >= chunk_size:
            emit(buf[:chunk_size], meta)
            emitted = True
            buf = buf[stride:]
        if final and buf and not drop_last and (len(buf) > overlap or not emitted):
            emit(buf, meta)
            return []
        return buf

    buf: list[int] = []
    buf_meta: dict = {}
    for i in range(0, len(items), batch_size):
        part = items[i:i + batch_size]
        enc = tokenizer([r["text"] for r in part], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for r, ids in zip(part, enc):
            ids = list(ids) + ([eos] if eos is not None else [])
            meta = {k: v for k, v in (r.get("metadata") or {}).items() if k in ("source", "line", "row")}
            if pack:
                if not buf:
                    buf_meta = meta
                buf = windows(buf + ids, buf_meta, final=False)
                if len(buf) <= overlap:
                    buf_meta = meta
            else:
                windows(ids, meta, final=True)
    if pack and buf:
        windows(buf, buf_meta, final=True)
    return out


# --------------------------------------------------------------------------- the pipeline stage
def _load_many(paths: list[tuple[str, str, str]], *, registries: Any, skip_invalid: bool, rejects: list,
               text_unit: str) -> dict[str, list[dict]]:
    out = {}
    for name, path, fmt in paths:
        out[name] = load_records(path, format=fmt, registries=registries, skip_invalid=skip_invalid,
                                 rejects=rejects, text_unit=text_unit)
        log.info("loaded %d rows from %s", len(out[name]), path)
    return out


def prepare_data(cfg: Any, registries: Any, out_dir: str | Path, context: Any = None, *,
                 progress: bool = False, report: bool = True) -> dict:
    """Load (sources, mixing, replay), clean, split and write a run's data.

    Writes into ``out_dir`` (the run's ``RunDir.data_dir``): ``train.jsonl``,
    ``validation.jsonl``, ``test.jsonl`` (canonical records), ``rejects.jsonl``,
    ``report.md``, ``report.json`` and ``token_lengths.png``. Returns the summary
    (also report.json): rows in / kept / rejected per cleaner, splits, mixing, replay,
    tokens, and ``files``.
    """
    from tunesmith.core.data_clean import clean_records, get_tokenizer
    from tunesmith.core.data_report import build_report, write_report
    from tunesmith.core.io import atomic_write_jsonl

    if context is None:
        from tunesmith.core.context import RunContext

        context = RunContext(config=cfg, registries=registries)
    d = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_unit = getattr(d, "text_unit", "paragraph")
    if d.sources:
        train_paths = [(s.path, str(cfg.resolve_path(s.path)), s.format if s.format != "auto" else d.format)
                       for s in d.sources]
        weights = {s.path: s.weight for s in d.sources}
    elif d.path:
        train_paths = [(d.path, str(cfg.resolve_path(d.path)), d.format)]
        weights = {d.path: None}
    else:
        raise ConfigError("no training data: set data.path or data.sources", key="data.path", source=cfg.source)
    load_rejects: list[dict] = []
    loaded = _load_many(train_paths, registries=registries, skip_invalid=d.skip_invalid, rejects=load_rejects,
                        text_unit=text_unit)
    fixed: dict[str, list[dict]] = {}
    for split_name, p in (("validation", d.validation_path), ("test", d.test_path)):
        if p:
            fixed[split_name] = load_records(cfg.resolve_path(p), format=d.format, registries=registries,
                                             skip_invalid=d.skip_invalid, rejects=load_rejects, text_unit=text_unit)
    # one pool, fixed evaluation files first: a training row that duplicates one of
    # them is the one dropped
    pool: list[dict] = []
    for split_name, rows in fixed.items():
        pool += [{**r, "metadata": {**r["metadata"], "_split": split_name}} for r in rows]
    for name, rows in loaded.items():
        pool += [{**r, "metadata": {**r["metadata"], "_src": name}} for r in rows]
    if not pool:
        raise DataError("no readable rows in the training data", path=train_paths[0][1])
    kind = record_kind(pool[0])
    for r in pool:
        if record_kind(r) != kind:
            raise DataError(f"{r['metadata'].get('source')}: {record_kind(r)} rows cannot be mixed with {kind} rows")
    rows_in = len(pool) + len(load_rejects)
    cleaned = clean_records(pool, d.cleaners, registries=registries, context=context, progress=progress,
                            total=len(pool))
    kept_fixed: dict[str, list[dict]] = defaultdict(list)
    kept_by_src: dict[str, list[dict]] = defaultdict(list)
    for r in cleaned.records:
        meta = dict(r["metadata"])
        fixed_split = meta.pop("_split", None)
        src = meta.pop("_src", None)
        r = {**r, "metadata": meta}
        (kept_fixed[fixed_split] if fixed_split else kept_by_src[src]).append(r)
    for rej in cleaned.rejects:
        rec = rej.get("record") or {}
        if "metadata" in rec:
            rej["record"] = {**rec, "metadata": {k: v for k, v in rec["metadata"].items() if k not in ("_split", "_src")}}
    # split each source the same way (stratification and ratios per source), over the
    # parts not given as files
    ratios = {"train": d.split.train, "validation": d.split.validation, "test": d.split.test}
    for s in fixed:
        ratios[s] = 0.0
    z = sum(ratios.values())
    if z <= 0:
        raise ConfigError("nothing left to train on: every split ratio is taken by a file", key="data.split")
    ratios = {k: v / z for k, v in ratios.items()}
    splits: dict[str, list[dict]] = {s: list(kept_fixed.get(s, [])) for s in SPLITS}
    train_parts = []
    for name, _, _ in train_paths:
        part = split_records(kept_by_src.get(name, []), seed=d.split.seed, stratify=d.split.stratify, **ratios)
        splits["validation"] += part["validation"]
        splits["test"] += part["test"]
        train_parts.append({"name": name, "records": part["train"], "weight": weights.get(name)})
    summary_extra: dict = {}
    if len(train_parts) > 1 or any(p["weight"] not in (None, 1.0) for p in train_parts):
        mixed, mix_summary = mix_sources(train_parts, strategy=d.mixing.strategy, temperature=d.mixing.temperature,
                                         seed=d.mixing.seed)
        splits["train"] = mixed
        summary_extra["mixing"] = mix_summary
    else:
        splits["train"] = train_parts[0]["records"] if train_parts else []
    if d.replay is not None:
        replay_rejects: list[dict] = []
        replay_rows = load_records(cfg.resolve_path(d.replay.path), format=d.replay.format, registries=registries,
                                   skip_invalid=d.skip_invalid, rejects=replay_rejects, text_unit=text_unit)
        if replay_rows and record_kind(replay_rows[0]) != kind:
            raise DataError(f"replay data is {record_kind(replay_rows[0])}, the training data is {kind}",
                            path=d.replay.path)
        replay_clean = clean_records(replay_rows, d.cleaners, registries=registries, context=context)
        load_rejects += replay_rejects
        cleaned.rejects.extend({**x, "stage": "clean (replay)"} for x in replay_clean.rejects)
        splits["train"], summary_extra["replay"] = add_replay(splits["train"], replay_clean.records, d.replay.ratio,
                                                              seed=d.mixing.seed)
    if not splits["train"]:
        raise DataError("no training rows left after cleaning and splitting",
                        hint=f"see {out / 'rejects.jsonl'} and {out / 'report.md'}")
    files = {}
    for s in SPLITS:
        files[s] = str(write_records(splits[s], out / f"{s}.jsonl"))
    rejects_path = atomic_write_jsonl(out / "rejects.jsonl", load_rejects + cleaned.rejects)
    files["rejects"] = str(rejects_path)
    sizes = {s: len(v) for s, v in splits.items()}
    summary_extra["cross_split_duplicates"] = cross_split_duplicates(
        {s: [r for r in v if not (r.get("metadata") or {}).get("replay")] for s, v in splits.items()})
    # every kept row once (before mixing repeats and replay)
    kept_all = splits["validation"] + splits["test"] + [r for p in train_parts for r in p["records"]]
    tokenizer = None
    if report:
        try:
            tokenizer = get_tokenizer(context)
        except Exception as exc:  # noqa: BLE001 - the report is still useful without tokens
            log.warning("no tokenizer for the data report (%s); token counts left out", exc)
    max_tokens = getattr(getattr(cfg, "training", None), "max_length", 2048)
    rep = build_report(kept_all, clean=cleaned, load_rejects=load_rejects, rows_in=rows_in, tokenizer=tokenizer,
                       max_tokens=max_tokens, splits=sizes, extra={"kind": kind, **summary_extra})
    files.update(report_md=str(out / "report.md"), report_json=str(out / "report.json"))
    if tokenizer is not None and kept_all:
        files["token_lengths"] = str(out / "token_lengths.png")
    rep["files"] = files
    rep = write_report(rep, md=out / "report.md", json_path=out / "report.json",
                       png=files.get("token_lengths"), max_tokens=max_tokens)
    return rep
