"""Human evaluation: blinded rating sheets, importing filled sheets, scores and agreement.

Flow::

    export_sheet(items, {"base": [...], "tuned": [...]}, out_dir)   # sheet.jsonl, sheet.csv, key.json
    # raters fill sheet.csv / sheet.jsonl, or use the rating page (serve_sheet)
    ratings = import_ratings([filled.csv, answers.jsonl], key="out_dir/key.json")
    summary = score(ratings)   # per model and criterion, Krippendorff's alpha

Each item shows the prompt, the reference answer (if any) and the outputs of every
model under the labels A, B, C, ... in an order drawn at random per item; the
model behind each label is only in ``key.json``. Ratings are integers 1-5 per
criterion (relevance, coherence, correctness by default).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tunesmith.core.errors import DataError, TunesmithError
from tunesmith.core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, iter_jsonl

CRITERIA = ("relevance", "coherence", "correctness")
SCALE = (1, 5)
SHEET_FORMAT = "tunesmith.human-eval/1"
CSV_FIELDS = ["item_id", "label", "prompt", "reference", "output", *CRITERIA, "rater", "comment"]


# --------------------------------------------------------------------------- export
def export_sheet(
    items: Sequence[dict],
    outputs: dict[str, Sequence[str]],
    out_dir: str | Path,
    *,
    n: int | None = None,
    seed: int = 0,
    criteria: Sequence[str] = CRITERIA,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a blinded rating sheet for ``n`` items (all when None).

    :param items: one dict per prompt with ``prompt`` and optionally ``reference``.
    :param outputs: model name -> one output per item (same order as ``items``).
    Returns the paths of ``sheet.jsonl``, ``sheet.csv`` and ``key.json`` (the
    unblinding key: keep it away from the raters).
    """
    out = Path(out_dir)
    if not outputs:
        raise TunesmithError("a rating sheet needs the outputs of at least one model")
    if len(outputs) > len(string.ascii_uppercase):
        raise TunesmithError("at most 26 models per sheet")
    for name, outs in outputs.items():
        if len(outs) != len(items):
            raise TunesmithError(f"model '{name}' has {len(outs)} outputs for {len(items)} prompts")
    if not items:
        raise TunesmithError("a rating sheet needs at least one prompt")
    sheet_path, csv_path, key_path = out / "sheet.jsonl", out / "sheet.csv", out / "key.json"
    check_sheet_dir(out, overwrite=overwrite)
    rng = random.Random(seed)
    chosen = list(range(len(items)))
    if n is not None and n < len(items):
        chosen = sorted(rng.sample(chosen, n))
    models = list(outputs)
    sheet_rows, key_items = [], {}
    for pos, idx in enumerate(chosen, start=1):
        order = models[:]
        rng.shuffle(order)
        item_id = f"item-{pos:04d}"
        labels = string.ascii_uppercase[: len(order)]
        key_items[item_id] = {lab: m for lab, m in zip(labels, order)}
        it = items[idx]
        sheet_rows.append(
            {
                "item_id": item_id,
                "prompt": str(it.get("prompt", "")),
                "reference": it.get("reference"),
                "outputs": [{"label": lab, "text": str(outputs[m][idx])} for lab, m in zip(labels, order)],
                "scores": {lab: {c: None for c in criteria} for lab in labels},
                "rater": "",
                "comment": "",
            }
        )
    key = {
        "format": SHEET_FORMAT,
        "seed": seed,
        "models": models,
        "criteria": list(criteria),
        "scale": list(SCALE),
        "source_rows": {f"item-{p:04d}": i for p, i in enumerate(chosen, start=1)},
        "items": key_items,
    }
    atomic_write_jsonl(sheet_path, sheet_rows)
    atomic_write_text(csv_path, sheet_to_csv(sheet_rows, criteria))
    atomic_write_json(key_path, key)
    return {"sheet": sheet_path, "csv": csv_path, "key": key_path}


def check_sheet_dir(out_dir: str | Path, *, overwrite: bool = False) -> None:
    """Refuse a folder that already holds a sheet (unless ``overwrite``)."""
    out = Path(out_dir)
    if not overwrite and any((out / n).exists() for n in ("sheet.jsonl", "sheet.csv", "key.json")):
        raise TunesmithError(f"{out} already holds a rating sheet", hint="pass --overwrite to replace it")


def sheet_to_csv(sheet_rows: Iterable[dict], criteria: Sequence[str] = CRITERIA) -> str:
    buf = io.StringIO()
    fields = ["item_id", "label", "prompt", "reference", "output", *criteria, "rater", "comment"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in sheet_rows:
        for o in row["outputs"]:
            sc = (row.get("scores") or {}).get(o["label"]) or {}
            w.writerow(
                {
                    "item_id": row["item_id"],
                    "label": o["label"],
                    "prompt": row["prompt"],
                    "reference": row.get("reference") or "",
                    "output": o["text"],
                    **{c: "" if sc.get(c) is None else sc.get(c) for c in criteria},
                    "rater": row.get("rater") or "",
                    "comment": row.get("comment") or "",
                }
            )
    return buf.getvalue()


def read_sheet(path: str | Path) -> list[dict]:
    """The items of a ``sheet.jsonl`` (blinded: no model names)."""
    p = Path(path)
    if not p.exists():
        raise DataError("rating sheet not found", path=str(p))
    rows = []
    for i, row in iter_jsonl(p.read_text(encoding="utf-8"), p):
        if not isinstance(row, dict) or "item_id" not in row or not isinstance(row.get("outputs"), list):
            raise DataError("not a rating-sheet item (needs 'item_id' and 'outputs')", path=str(p), line=i)
        rows.append(row)
    if not rows:
        raise DataError("the rating sheet is empty", path=str(p))
    return rows


def read_key(path: str | Path) -> dict:
    p = Path(path)
    try:
        key = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("unblinding key not found", path=str(p)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", path=str(p), line=exc.lineno) from None
    if key.get("format") != SHEET_FORMAT or not isinstance(key.get("items"), dict):
        raise DataError(f"not a tunesmith unblinding key (format {SHEET_FORMAT})", path=str(p))
    return key


# --------------------------------------------------------------------------- import
@dataclass(frozen=True)
class Rating:
    item_id: str
    label: str
    model: str
    rater: str
    criterion: str
    score: int
    source: str = ""
    line: int = 0


def parse_score(value: Any, *, criterion: str, label: str, path: str, line: int, scale: Sequence[int] = SCALE) -> int | None:
    """An integer rating in the scale, None when blank; a DataError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    v: Any = value
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise DataError(f"rating '{value}' for {criterion} of output {label} is not a number", path=path, line=line) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise DataError(f"rating {value!r} for {criterion} of output {label} is not a whole number 1–5", path=path, line=line)
    v = int(v)
    lo, hi = scale
    if not lo <= v <= hi:
        raise DataError(f"rating {v} for {criterion} of output {label} is outside {lo}–{hi}", path=path, line=line)
    return v


def _rows_of(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a filled CSV or JSONL sheet, or the rating page's answers file;
    CSV rows are regrouped into the JSONL shape (one row per item and rater)."""
    if not path.exists():
        raise DataError("file not found", path=str(path))
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError("the file is empty", path=str(path))
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"item_id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"a filled sheet needs the columns {', '.join(sorted(missing))}", path=str(path), line=1)
        out = []
        for i, r in enumerate(reader, start=2):
            crits = {k: v for k, v in r.items() if k not in ("item_id", "label", "prompt", "reference", "output", "rater", "comment") and k}
            out.append(
                (i, {"item_id": r["item_id"], "rater": r.get("rater") or "", "comment": r.get("comment") or "", "scores": {r["label"]: crits}})
            )
        return out
    out = []
    for i, row in iter_jsonl(text, path):
        if not isinstance(row, dict) or "item_id" not in row or not isinstance(row.get("scores"), dict):
            raise DataError("row has no 'item_id' and 'scores': not a filled rating sheet", path=str(path), line=i)
        out.append((i, row))
    return out


def import_ratings(paths: Sequence[str | Path], key: str | Path | dict) -> list[Rating]:
    """Unblinded ratings from filled sheets (CSV/JSONL) and rating-page answer files.

    A row's rater is its ``rater`` field, else the file's name. Blank scores are
    skipped; a score outside 1-5, an unknown item, label or criterion is a
    :class:`DataError` naming the file and row. For one rater rating one output
    twice, the later row wins.
    """
    k = key if isinstance(key, dict) else read_key(key)
    criteria = list(k.get("criteria") or CRITERIA)
    scale = tuple(k.get("scale") or SCALE)
    found: dict[tuple, Rating] = {}
    for p in map(Path, paths):
        for line, row in _rows_of(p):
            item = str(row["item_id"])
            if item not in k["items"]:
                raise DataError(f"unknown item '{item}' (not in the key)", path=str(p), line=line)
            rater = str(row.get("rater") or "").strip() or p.stem
            for label, crit_scores in row["scores"].items():
                if label not in k["items"][item]:
                    raise DataError(f"item '{item}' has no output '{label}'", path=str(p), line=line)
                if not isinstance(crit_scores, dict):
                    raise DataError(f"scores of output {label} must be an object of criteria", path=str(p), line=line)
                for crit, value in crit_scores.items():
                    if crit not in criteria:
                        raise DataError(f"unknown criterion '{crit}'; criteria: {', '.join(criteria)}", path=str(p), line=line)
                    v = parse_score(value, criterion=crit, label=label, path=str(p), line=line, scale=scale)
                    if v is None:
                        continue
                    found[(rater, item, label, crit)] = Rating(
                        item, label, k["items"][item][label], rater, crit, v, str(p), line
                    )
    return list(found.values())


# --------------------------------------------------------------------------- Krippendorff's alpha
def krippendorff_alpha(reliability_data: Sequence[Sequence[Any]], level: str = "interval") -> float:
    """Krippendorff's alpha of a raters x units matrix (None or NaN = missing).

    ``level`` is ``nominal``, ``ordinal`` or ``interval``. Built from the
    coincidence matrix (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):
    alpha = 1 - (n - 1) * sum o_ck d_ck / sum n_c n_k d_ck. NaN when fewer than two
    pairable values exist or every value is the same.
    """
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, not {level!r}")

    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    n_units = max((len(r) for r in reliability_data), default=0)
    values = sorted({v for r in reliability_data for v in r if not missing(v)})
    index = {v: i for i, v in enumerate(values)}
    V = len(values)
    o = [[0.0] * V for _ in range(V)]
    for u in range(n_units):
        vals = [r[u] for r in reliability_data if u < len(r) and not missing(r[u])]
        m = len(vals)
        if m < 2:
            continue
        counts: dict[Any, int] = {}
        for v in vals:
            counts[v] = counts.get(v, 0) + 1
        for c, nc in counts.items():
            for kk, nk in counts.items():
                pairs = nc * (nk - (1 if c == kk else 0))
                o[index[c]][index[kk]] += pairs / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)
    if n <= 1 or V < 2:
        return float("nan")

    def delta(i: int, j: int) -> float:
        if level == "nominal":
            return 0.0 if i == j else 1.0
        if level == "interval":
            return float(values[i] - values[j]) ** 2
        lo, hi = min(i, j), max(i, j)
        return (sum(n_c[lo : hi + 1]) - (n_c[i] + n_c[j]) / 2.0) ** 2

    d_o = sum(o[i][j] * delta(i, j) for i in range(V) for j in range(V))
    d_e = sum(n_c[i] * n_c[j] * delta(i, j) for i in range(V) for j in range(V))
    if d_e == 0:
        return float("nan")
    return 1.0 - (n - 1) * d_o / d_e


def reliability_matrix(ratings: Sequence[Rating], criterion: str | None = None) -> tuple[list[list[Any]], list[str], list[tuple]]:
    """raters x units matrix (units: item, label and, when pooling criteria, criterion)."""
    raters = sorted({r.rater for r in ratings})
    units = sorted({(r.item_id, r.label) + (() if criterion else (r.criterion,)) for r in ratings if criterion in (None, r.criterion)})
    ui = {u: i for i, u in enumerate(units)}
    ri = {r: i for i, r in enumerate(raters)}
    m: list[list[Any]] = [[None] * len(units) for _ in raters]
    for r in ratings:
        if criterion is not None and r.criterion != criterion:
            continue
        u = (r.item_id, r.label) + (() if criterion else (r.criterion,))
        m[ri[r.rater]][ui[u]] = r.score
    return m, raters, units


# --------------------------------------------------------------------------- scores
def score(ratings: Sequence[Rating], criteria: Sequence[str] | None = None) -> dict:
    """Per model and criterion: mean, standard deviation, n; Krippendorff's alpha
    (ordinal and interval) per criterion and pooled; models ranked by overall mean."""
    if not ratings:
        raise TunesmithError("no ratings to score: the sheets have no filled-in scores")
    criteria = list(criteria or sorted({r.criterion for r in ratings}, key=lambda c: (c not in CRITERIA, CRITERIA.index(c) if c in CRITERIA else 0, c)))
    models = sorted({r.model for r in ratings})
    per_model: dict[str, dict] = {}
    for m in models:
        per_model[m] = {}
        allv = []
        for c in criteria:
            vals = [r.score for r in ratings if r.model == m and r.criterion == c]
            allv += vals
            per_model[m][c] = _stats(vals)
        per_model[m]["overall"] = _stats(allv)
    alpha: dict[str, dict] = {}
    for c in criteria:
        mat, raters, units = reliability_matrix(ratings, c)
        alpha[c] = {
            "ordinal": _nan_none(krippendorff_alpha(mat, "ordinal")),
            "interval": _nan_none(krippendorff_alpha(mat, "interval")),
            "raters": len(raters),
            "units": len(units),
        }
    mat, raters, units = reliability_matrix(ratings, None)
    alpha["all"] = {
        "ordinal": _nan_none(krippendorff_alpha(mat, "ordinal")),
        "interval": _nan_none(krippendorff_alpha(mat, "interval")),
        "raters": len(raters),
        "units": len(units),
    }
    ranking = sorted(models, key=lambda m: -(per_model[m]["overall"]["mean"] or 0))
    return {
        "models": models,
        "criteria": criteria,
        "raters": sorted({r.rater for r in ratings}),
        "items": len({r.item_id for r in ratings}),
        "ratings": len(ratings),
        "per_model": per_model,
        "alpha": alpha,
        "ranking": ranking,
    }


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _stats(vals: Sequence[int]) -> dict:
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def render_score_markdown(summary: dict) -> str:
    crits = summary["criteria"]
    lines = [
        "# Human evaluation",
        "",
        f"{summary['ratings']} ratings of {summary['items']} items by {len(summary['raters'])} rater(s): {', '.join(summary['raters'])}.",
        "",
        "| model | " + " | ".join(crits) + " | overall |",
        "| --- |" + " ---: |" * (len(crits) + 1),
    ]
    for m in summary["ranking"]:
        cells = []
        for c in crits + ["overall"]:
            s = summary["per_model"][m][c]
            cells.append("–" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Krippendorff's alpha (inter-rater reliability; 1 = perfect agreement, 0 = chance):", "",
              "| criterion | ordinal | interval | raters | units |", "| --- | ---: | ---: | ---: | ---: |"]
    for c, a in summary["alpha"].items():
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {c} | {f(a['ordinal'])} | {f(a['interval'])} | {a['raters']} | {a['units']} |")
    lines.append("")
    return "\n".join(lines)


def ratings_as_rows(ratings: Sequence[Rating]) -> list[dict]:
    return [asdict(r) for r in ratings]
