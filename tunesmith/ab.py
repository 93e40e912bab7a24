"""A/B tests: deterministic routing and the statistics of a request log.

Routing: ``md5(request_id) mod 100`` against the split, so one request id always
goes to the same variant, in every process, without shared state.

Analysis of a JSONL log (one request per line: ``variant`` or ``request_id``,
``latency_ms``, optionally ``success``): per variant count, mean, p50 and p95
latency and success rate; Welch's t-test on latency; a two-proportion z-test on
success; and a plain verdict at ``alpha``. As in the guide, the latency test is
only trusted when both variants have more than 30 requests.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Sequence

from tunesmith.core.errors import DataError, TunesmithError
from tunesmith.core.io import iter_jsonl

MIN_SAMPLES = 30  # the guide's rule: a t-test needs more than 30 results per variant
LATENCY_KEYS = ("latency_ms", "latency")
SUCCESS_KEYS = ("success", "ok", "converted")


def bucket(request_id: str) -> int:
    """0-99 from the MD5 of the request id."""
    return int(hashlib.md5(str(request_id).encode("utf-8")).hexdigest(), 16) % 100


def route(request_id: str, split: float = 50.0, variants: Sequence[str] = ("A", "B")) -> str:
    """The variant of a request: the first ``split`` percent of buckets go to ``variants[0]``.

    ``split`` may also be a list of percentages, one per variant, summing to 100.
    """
    b = bucket(request_id)
    if isinstance(split, (list, tuple)):
        if len(split) != len(variants) or abs(sum(split) - 100) > 1e-9:
            raise TunesmithError("a split per variant must have one percentage per variant, summing to 100")
        edge = 0.0
        for v, share in zip(variants, split):
            edge += share
            if b < edge:
                return v
        return variants[-1]
    if not 0 <= split <= 100:
        raise TunesmithError(f"split must be a percentage 0-100, got {split}")
    return variants[0] if b < split else variants[1]


# --------------------------------------------------------------------------- statistics
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's unequal-variance t-test (two-sided): t, Welch-Satterthwaite df, p."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"t": None, "df": None, "p_value": None}
    va, vb = _var(a) / len(a), _var(b) / len(b)
    if va + vb == 0:
        return {"t": None, "df": None, "p_value": None}
    t = (_mean(a) - _mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = 2.0 * float(stats.t.sf(abs(t), df))
    return {"t": t, "df": df, "p_value": p}


def two_proportion_z_test(success_a: int, n_a: int, success_b: int, n_b: int) -> dict:
    """Pooled two-proportion z-test (two-sided)."""
    from scipy import stats

    if n_a == 0 or n_b == 0:
        return {"z": None, "p_value": None}
    p = (success_a + success_b) / (n_a + n_b)
    se = math.sqrt(p * (1 - p) * (1 / n_a + 1 / n_b))
    if se == 0:
        return {"z": None, "p_value": None}
    z = (success_a / n_a - success_b / n_b) / se
    return {"z": z, "p_value": 2.0 * float(stats.norm.sf(abs(z)))}


# --------------------------------------------------------------------------- the log
def _success(v: Any, path: str, line: int) -> bool | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise DataError(f"'success' must be true/false or 1/0, got {v!r}", path=path, line=line)


def read_log(path: str | Path, *, split: float = 50.0, variants: Sequence[str] = ("A", "B")) -> list[dict]:
    """Rows ``{variant, latency_ms, success}`` of a JSONL request log.

    A row without ``variant`` is routed by its ``request_id``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=str(p))
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError("the log is empty", path=str(p))
    rows = []
    for i, r in iter_jsonl(text, p):
        if not isinstance(r, dict):
            raise DataError("each line must be a JSON object", path=str(p), line=i)
        variant = r.get("variant")
        if variant is None:
            if r.get("request_id") is None:
                raise DataError("row has neither 'variant' nor 'request_id'", path=str(p), line=i)
            variant = route(str(r["request_id"]), split, variants)
        lat = next((r[k] for k in LATENCY_KEYS if k in r), None)
        if lat is None or isinstance(lat, bool) or not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat < 0:
            raise DataError(f"row needs a non-negative number 'latency_ms', got {lat!r}", path=str(p), line=i)
        succ = next((r[k] for k in SUCCESS_KEYS if k in r), None)
        rows.append({"variant": str(variant), "latency_ms": float(lat), "success": _success(succ, str(p), i)})
    return rows


def analyze(rows: Sequence[dict], *, alpha: float = 0.05, control: str | None = None) -> dict:
    """Per-variant statistics, the two tests and a plain verdict.

    With more than two variants, ``control`` (default: the first in sort order)
    is compared with the first other variant; pass exactly two for a clean test.
    """
    if not rows:
        raise TunesmithError("no requests to analyse")
    names = sorted({r["variant"] for r in rows})
    per: dict[str, dict] = {}
    for v in names:
        lat = [r["latency_ms"] for r in rows if r["variant"] == v]
        succ = [r["success"] for r in rows if r["variant"] == v and r["success"] is not None]
        per[v] = {
            "count": len(lat),
            "latency_mean_ms": _mean(lat),
            "latency_p50_ms": percentile(lat, 50),
            "latency_p95_ms": percentile(lat, 95),
            "latency_std_ms": math.sqrt(_var(lat)) if len(lat) > 1 else 0.0,
            "success_count": sum(succ) if succ else None,
            "success_n": len(succ),
            "success_rate": (sum(succ) / len(succ)) if succ else None,
        }
    out: dict[str, Any] = {"alpha": alpha, "variants": per, "verdict": []}
    if len(names) < 2:
        out["verdict"].append(f"only one variant ({names[0]}) in the log: nothing to compare")
        return out
    a = control or names[0]
    if a not in per:
        raise TunesmithError(f"control variant '{a}' is not in the log; variants: {', '.join(names)}")
    b = next(v for v in names if v != a)
    out["control"], out["treatment"] = a, b
    la = [r["latency_ms"] for r in rows if r["variant"] == a]
    lb = [r["latency_ms"] for r in rows if r["variant"] == b]
    t = welch_t_test(la, lb)
    enough = len(la) > MIN_SAMPLES and len(lb) > MIN_SAMPLES
    t["enough_data"] = enough
    t["significant"] = bool(enough and t["p_value"] is not None and t["p_value"] < alpha)
    out["latency_test"] = t
    ma, mb = per[a]["latency_mean_ms"], per[b]["latency_mean_ms"]
    if not enough:
        out["verdict"].append(
            f"latency: not enough data for a verdict (need more than {MIN_SAMPLES} requests per variant; "
            f"{a} has {len(la)}, {b} has {len(lb)})"
        )
    elif t["significant"]:
        faster, slower = (b, a) if mb < ma else (a, b)
        out["verdict"].append(
            f"latency: {faster} is faster than {slower} ({min(ma, mb):.1f} ms vs {max(ma, mb):.1f} ms mean, "
            f"p = {t['p_value']:.3g} < {alpha})"
        )
    else:
        p = "n/a" if t["p_value"] is None else f"{t['p_value']:.3g}"
        out["verdict"].append(f"latency: no significant difference ({ma:.1f} ms vs {mb:.1f} ms mean, p = {p} ≥ {alpha})")
    sa, sb = per[a], per[b]
    if sa["success_n"] and sb["success_n"]:
        z = two_proportion_z_test(sa["success_count"], sa["success_n"], sb["success_count"], sb["success_n"])
        z["significant"] = bool(z["p_value"] is not None and z["p_value"] < alpha)
        out["success_test"] = z
        ra, rb = sa["success_rate"], sb["success_rate"]
        if z["significant"]:
            better, worse = (b, a) if rb > ra else (a, b)
            out["verdict"].append(
                f"success: {better} succeeds more often than {worse} ({max(ra, rb):.1%} vs {min(ra, rb):.1%}, "
                f"p = {z['p_value']:.3g} < {alpha})"
            )
        else:
            p = "n/a" if z["p_value"] is None else f"{z['p_value']:.3g}"
            out["verdict"].append(f"success: no significant difference ({ra:.1%} vs {rb:.1%}, p = {p} ≥ {alpha})")
    return out


def render_markdown(result: dict) -> str:
    lines = ["# A/B analysis", "", "| variant | count | mean ms | p50 ms | p95 ms | success rate |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for v, s in result["variants"].items():
        rate = "–" if s["success_rate"] is None else f"{s['success_rate']:.1%}"
        lines.append(
            f"| {v} | {s['count']} | {s['latency_mean_ms']:.1f} | {s['latency_p50_ms']:.1f} | {s['latency_p95_ms']:.1f} | {rate} |"
        )
    lines += ["", f"Verdict at alpha = {result['alpha']}:", ""] + [f"- {v}" for v in result["verdict"]] + [""]
    return "\n".join(lines)
