"""The eval, human-eval and ab commands end to end on tiny models."""

import json

import numpy as np
import pytest

from tunesmith.cli import main

from .conftest import write_jsonl


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def ok_cli(capsys, *argv):
    try:
        main(list(argv))
    except SystemExit as exc:
        out = capsys.readouterr()
        raise AssertionError(f"exit {exc.code}: {out.err}") from None
    return capsys.readouterr().out


def test_eval_compare_then_human_eval_round_trip(tmp_path, capsys, tiny_model_dir, tiny_model_dir_b, qa_file):
    out = tmp_path / "cmp"
    rep = json.loads(ok_cli(
        capsys, "eval", "compare", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--data", str(qa_file),
        "-e", "perplexity", "-e", "generation", "--limit", "3", "--max-new-tokens", "3", "-o", str(out), "--json",
    ))
    assert set(rep["comparison"]) == {"perplexity", "generation"}
    assert (out / "report.md").exists() and (out / "charts" / "perplexity.png").exists()
    he = tmp_path / "he"
    paths = json.loads(ok_cli(capsys, "human-eval", "export", "--from-eval", str(out), "-o", str(he), "--seed", "2", "--json"))
    sheet = [json.loads(x) for x in (he / "sheet.jsonl").read_text().splitlines()]
    assert len(sheet) == 3 and all(len(r["outputs"]) == 2 for r in sheet)
    key = json.loads((he / "key.json").read_text())
    for rater, bonus in (("ann", 0), ("ben", 1)):
        rows = []
        for r in sheet:
            r = json.loads(json.dumps(r))
            for o in r["outputs"]:
                q = 4 if key["items"][r["item_id"]][o["label"]] == "tuned" else 2
                r["scores"][o["label"]] = {c: q + (bonus if c == "coherence" and r["item_id"] == "item-0001" else 0) for c in key["criteria"]}
            r["rater"] = rater
            rows.append(r)
        write_jsonl(tmp_path / f"{rater}.jsonl", rows)
    summary = json.loads(ok_cli(capsys, "human-eval", "score", str(tmp_path / "ann.jsonl"), str(tmp_path / "ben.jsonl"), "--key", paths["key"], "--json"))
    assert summary["ranking"] == ["tuned", "base"] and summary["raters"] == ["ann", "ben"]
    assert summary["alpha"]["relevance"]["ordinal"] == pytest.approx(1.0)
    ok_cli(capsys, "human-eval", "import", str(tmp_path / "ann.jsonl"), "--key", paths["key"], "-o", str(tmp_path / "ratings.jsonl"))
    assert len((tmp_path / "ratings.jsonl").read_text().splitlines()) == 3 * 2 * 3
    # a rating outside 1-5 is a one-line error naming the file and row
    bad = json.loads((tmp_path / "ann.jsonl").read_text().splitlines()[1])
    bad["scores"]["A"]["correctness"] = 7
    write_jsonl(tmp_path / "bad.jsonl", [bad])
    code, _, err = run_cli(capsys, "human-eval", "score", str(tmp_path / "bad.jsonl"), "--key", paths["key"])
    assert code == 3 and "bad.jsonl:1: rating 7 for correctness of output A is outside 1–5" in err
    assert len(err.strip().splitlines()) == 1


def test_ab_analyze_command(tmp_path, capsys):
    rng = np.random.default_rng(5)
    rows = [{"request_id": f"r{i}", "latency_ms": float(rng.normal(100, 5)), "success": bool(rng.random() < 0.7)} for i in range(200)]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    res = json.loads(ok_cli(capsys, "ab", "analyze", str(log), "--split", "30", "--json", "-o", str(tmp_path / "ab.md")))
    assert res["variants"]["A"]["count"] + res["variants"]["B"]["count"] == 200
    assert 40 < res["variants"]["A"]["count"] < 85
    assert "latency: no significant difference" in res["verdict"][0]
    assert (tmp_path / "ab.md").read_text().startswith("# A/B analysis")
    code, _, err = run_cli(capsys, "ab", "analyze", str(write_jsonl(tmp_path / "x.jsonl", [{"latency_ms": 3}])))
    assert code == 3 and "x.jsonl:1" in err


def test_human_eval_export_generates_with_models(tmp_path, capsys, tiny_model_dir, tiny_model_dir_b, qa_file):
    out = tmp_path / "he"
    ok_cli(
        capsys, "human-eval", "export", "--data", str(qa_file), "--model", f"one={tiny_model_dir}", "--model", f"two={tiny_model_dir_b}",
        "-n", "2", "--max-new-tokens", "3", "-o", str(out),
    )
    key = json.loads((out / "key.json").read_text())
    assert key["models"] == ["one", "two"] and len(key["items"]) == 2
    assert len((out / "sheet.csv").read_text().strip().splitlines()) == 1 + 2 * 2
    code, _, err = run_cli(capsys, "human-eval", "export", "--data", str(qa_file), "--model", f"one={tiny_model_dir}", "-o", str(out))
    assert code == 1 and "already holds a rating sheet" in err
