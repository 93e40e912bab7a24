"""The data report: counts per cleaner, valid ratio, tokens, issues, a token-length histogram.

Token counts are of the content (turn texts) under the run's real tokenizer, without
special tokens: the chat template adds a few tokens per turn on top.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunesmith.core.data import completion_text, prompt_text, record_kind

_WORD = re.compile(r"\w+")


def record_issues(record: dict, prompt_tokens: int, completion_tokens: int, *, max_tokens: int = 2048) -> list[str]:
    """The guide's validation flags for one record (they are reported, not dropped)."""
    issues = []
    if prompt_tokens > max_tokens:
        issues.append("prompt_over_max_tokens")
    if completion_tokens > max_tokens:
        issues.append("completion_over_max_tokens")
    kind = record_kind(record)
    if kind != "text":
        if not prompt_text(record).strip():
            issues.append("empty_instruction")
        out = completion_text(record)
        words = _WORD.findall(out.lower())
        if not out.strip():
            issues.append("empty_output")
        elif len(words) < 5:
            issues.append("output_under_5_words")
        if len(words) >= 10:
            tri = list(zip(words, words[1:], words[2:]))
            if len(set(tri)) / len(tri) < 0.3:
                issues.append("repetition")
    return issues


def token_stats(records: list[dict], tokenizer: Any, *, batch: int = 1024) -> tuple[list[int], list[int]]:
    """(prompt token counts, completion token counts) per record."""
    from tunesmith.core.data_clean import count_tokens

    p_counts: list[int] = []
    c_counts: list[int] = []
    for i in range(0, len(records), batch):
        part = records[i:i + batch]
        prompts = [prompt_text(r) for r in part]
        comps = [completion_text(r) for r in part]
        p_counts += count_tokens(tokenizer, prompts)
        c_counts += count_tokens(tokenizer, comps)
    return p_counts, c_counts


def build_report(
    records: list[dict],
    *,
    clean: Any = None,
    load_rejects: list[dict] | None = None,
    rows_in: int | None = None,
    tokenizer: Any = None,
    max_tokens: int = 2048,
    splits: dict[str, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """The report as a dict (what report.json holds).

    :param records: the kept records.
    :param clean: the :class:`~tunesmith.core.data_clean.CleanResult`, for per-cleaner counts.
    :param load_rejects: rows that could not be read (``--skip-invalid``).
    :param tokenizer: for token counts; without one they are left out.
    """
    load_rejects = load_rejects or []
    clean_summary = clean.summary() if clean is not None else None
    read_ok = clean_summary["rows_in"] if clean_summary else len(records)
    total = rows_in if rows_in is not None else read_ok + len(load_rejects)
    invalid = total - len(records)
    report: dict = {
        "total": total,
        "valid": len(records),
        "invalid": invalid,
        "valid_ratio": round(len(records) / total, 4) if total else 0.0,
        "unreadable": len(load_rejects),
        "kind": record_kind(records[0]) if records else None,
        "cleaners": clean_summary["cleaners"] if clean_summary else [],
    }
    if load_rejects:
        report["unreadable_reasons"] = dict(Counter(r["reason"].split(":")[0] for r in load_rejects).most_common())
    issues: Counter = Counter()
    if tokenizer is not None and records:
        p, c = token_stats(records, tokenizer)
        totals = [a + b for a, b in zip(p, c)]
        report["tokens"] = {
            "total": sum(totals),
            "average": round(sum(totals) / len(totals), 2),
            "average_prompt": round(sum(p) / len(p), 2),
            "average_completion": round(sum(c) / len(c), 2),
            "max": max(totals),
            "p50": _pct(totals, 50),
            "p95": _pct(totals, 95),
        }
        report["_lengths"] = totals  # popped by write_report for the histogram
        for r, a, b in zip(records, p, c):
            issues.update(record_issues(r, a, b, max_tokens=max_tokens))
    else:
        for r in records:
            issues.update(record_issues(r, 0, 0, max_tokens=max_tokens))
    report["issues"] = dict(issues.most_common())
    if splits:
        report["splits"] = splits
    if extra:
        report.update(extra)
    return report


def _pct(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def render_markdown(report: dict, *, histogram: str | None = None) -> str:
    lines = ["# Data report", ""]
    lines += [
        "| | |",
        "| --- | --- |",
        f"| rows in | {report['total']} |",
        f"| valid (kept) | {report['valid']} |",
        f"| invalid (dropped or unreadable) | {report['invalid']} |",
        f"| valid ratio | {report['valid_ratio']:.1%} |",
        f"| unreadable rows | {report['unreadable']} |",
    ]
    tok = report.get("tokens")
    if tok:
        lines += [
            f"| total tokens | {tok['total']} |",
            f"| average tokens per row | {tok['average']} (prompt {tok['average_prompt']}, completion {tok['average_completion']}) |",
            f"| tokens p50 / p95 / max | {tok['p50']} / {tok['p95']} / {tok['max']} |",
        ]
    lines.append("")
    if report.get("cleaners"):
        lines += ["## Cleaners", "", "| cleaner | in | kept | rejected | rewritten | reasons | seconds |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for c in report["cleaners"]:
            reasons = ", ".join(f"{k} {v}" for k, v in c["reasons"].items())
            if c.get("replacements"):
                reasons = (reasons + "; " if reasons else "") + "replaced " + ", ".join(
                    f"{k} {v}" for k, v in c["replacements"].items())
            lines.append(f"| {c['name']} | {c['in']} | {c['kept']} | {c['rejected']} | {c['modified']} | {reasons} | {c['seconds']} |")
        lines.append("")
    if report.get("unreadable_reasons"):
        lines += ["## Unreadable rows", ""] + [f"- {k}: {v}" for k, v in report["unreadable_reasons"].items()] + [""]
    lines += ["## Issues in the kept rows", ""]
    if report.get("issues"):
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in report["issues"].items()]
    else:
        lines.append("none")
    lines.append("")
    if report.get("splits"):
        lines += ["## Splits", ""] + [f"- {k}: {v}" for k, v in report["splits"].items()]
        if "cross_split_duplicates" in report:
            lines.append(f"- duplicates across splits: {report['cross_split_duplicates']}")
        lines.append("")
    if histogram:
        lines += ["## Token lengths", "", f"![token lengths]({histogram})", ""]
    return "\n".join(lines)


def plot_histogram(lengths: list[int], path: str | Path, *, max_tokens: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunesmith.core.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#3b7dd8", edgecolor="white")
    if max_tokens:
        ax.axvline(max_tokens, color="#c0392b", linestyle="--", label=f"max {max_tokens}")
        ax.legend()
    ax.set_xlabel("tokens per row (content)")
    ax.set_ylabel("rows")
    ax.set_title(f"Token lengths ({len(lengths)} rows)")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(report: dict, *, md: str | Path | None = None, json_path: str | Path | None = None,
                 png: str | Path | None = None, max_tokens: int | None = None) -> dict:
    """Write report.md / report.json / token_lengths.png (each optional); returns the report without raw lengths."""
    from tunesmith.core.io import atomic_write_json, atomic_write_text

    report = dict(report)
    lengths = report.pop("_lengths", None)
    hist_name = None
    if png and lengths:
        plot_histogram(lengths, png, max_tokens=max_tokens)
        hist_name = Path(png).name if md and Path(png).parent == Path(md).parent else str(png)
    if json_path:
        atomic_write_json(json_path, report)
    if md:
        atomic_write_text(md, render_markdown(report, histogram=hist_name))
    return report
