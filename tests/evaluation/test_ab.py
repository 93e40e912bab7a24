"""A/B routing and statistics, checked against scipy."""

import json
import random

import numpy as np
import pytest
from scipy import stats

from tunesmith.ab import analyze, bucket, percentile, read_log, route, two_proportion_z_test, welch_t_test
from tunesmith.core.errors import DataError


def test_routing_is_md5_mod_100_and_deterministic():
    import hashlib

    for rid in ["req-1", "req-2", "user-42", ""]:
        assert bucket(rid) == int(hashlib.md5(rid.encode()).hexdigest(), 16) % 100
        assert route(rid, 50) == route(rid, 50)
    ids = [f"r{i}" for i in range(4000)]
    share = sum(route(i, 20) == "A" for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert all(route(i, 0) == "B" for i in ids[:50]) and all(route(i, 100) == "A" for i in ids[:50])
    three = {route(i, [10, 30, 60], ["x", "y", "z"]) for i in ids[:500]}
    assert three == {"x", "y", "z"}


def test_welch_against_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(100, 10, 40).tolist(), rng.normal(95, 25, 55).tolist()
    mine = welch_t_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert mine["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert mine["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert mine["df"] == pytest.approx(ref.df, rel=1e-10)


def test_two_proportions_against_scipy_chi2():
    # a pooled two-proportion z-test is the uncorrected 2x2 chi-square test: z^2 = chi2
    mine = two_proportion_z_test(45, 100, 60, 110)
    chi2, p, _, _ = stats.chi2_contingency([[45, 55], [60, 50]], correction=False)
    assert mine["z"] ** 2 == pytest.approx(chi2, rel=1e-10)
    assert mine["p_value"] == pytest.approx(p, rel=1e-9)


def test_percentiles_match_numpy():
    xs = [random.Random(3).random() * 100 for _ in range(37)]
    for q in (50, 95):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def _log(tmp_path, rows):
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_analyze_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"variant": "A", "latency_ms": float(x), "success": bool(s)} for x, s in zip(rng.normal(200, 20, 80), rng.random(80) < 0.5)]
    rows += [{"variant": "B", "latency_ms": float(x), "success": bool(s)} for x, s in zip(rng.normal(150, 20, 80), rng.random(80) < 0.9)]
    res = analyze(read_log(_log(tmp_path, rows)), alpha=0.05)
    la = [r["latency_ms"] for r in rows if r["variant"] == "A"]
    assert res["variants"]["A"]["count"] == 80
    assert res["variants"]["A"]["latency_mean_ms"] == pytest.approx(np.mean(la))
    assert res["variants"]["A"]["latency_p95_ms"] == pytest.approx(np.percentile(la, 95))
    assert res["latency_test"]["significant"] and res["success_test"]["significant"]
    assert res["verdict"][0].startswith("latency: B is faster than A")
    assert res["verdict"][1].startswith("success: B succeeds more often than A")


def test_small_samples_give_no_latency_verdict(tmp_path):
    rows = [{"request_id": f"id{i}", "latency_ms": 100 + i} for i in range(20)]
    res = analyze(read_log(_log(tmp_path, rows), split=50))
    assert "not enough data" in res["verdict"][0]
    assert sum(v["count"] for v in res["variants"].values()) == 20


def test_bad_log_rows_name_file_and_line(tmp_path):
    p = _log(tmp_path, [{"variant": "A", "latency_ms": 1}, {"variant": "B"}])
    with pytest.raises(DataError, match=r"log\.jsonl:2: .*latency_ms"):
        read_log(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_log(empty)
