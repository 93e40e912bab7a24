"""Report, splits, mixing, replay, chunking, prepare_data and the data CLI on real files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from tunesmith.core.data import load_records
from tunesmith.core.data_ops import (
    add_replay, chunk_texts, mix_counts, mix_sources, split_records,
)

from .conftest import chat, run_cli, write_jsonl


def _words(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                    for _ in range(n))


def _alpaca_rows(n, cat_of=lambda i: ["a", "b", "c"][i % 3]):
    """Distinct rows (random words: no accidental near-duplicates)."""
    return [{"instruction": f"Explain {_words(i, 6)}?", "output": f"It is {_words(1000 + i, 12)}.", "category": cat_of(i)}
            for i in range(n)]


def test_split_is_deterministic_with_ratios_and_strata():
    recs = [chat(f"q{i}", f"a{i}", category=["x", "y"][i % 4 == 0]) for i in range(200)]
    a = split_records(recs, seed=42, stratify="category")
    b = split_records(list(recs), seed=42, stratify="category")
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {"train": 160, "validation": 20, "test": 20}
    for part in a.values():  # every split keeps the 1:3 proportion of the strata
        c = Counter(r["metadata"]["category"] for r in part)
        assert c["y"] * 3 == c["x"]
    other = split_records(recs, seed=7)
    assert other["test"] != a["test"]
    assert sorted(id(r) for p in a.values() for r in p) == sorted(id(r) for r in recs)


def test_mix_counts_follow_the_guide():
    assert mix_counts([1000, 100], [1, 1], "proportional") == [1000, 100]
    assert mix_counts([1000, 100], [0.5, 2], "proportional") == [500, 200]
    assert mix_counts([1000, 100], [1, 1], "equal") == [100, 100]
    t = mix_counts([1000, 100], [1, 1], "temperature", 2.0)
    assert sum(t) == 1100 and abs(t[0] / t[1] - (1000 / 100) ** 0.5) < 0.05


def test_mix_and_replay_records():
    big = [{"text": f"big {i}", "metadata": {}} for i in range(90)]
    small = [{"text": f"small {i}", "metadata": {}} for i in range(10)]
    mixed, summary = mix_sources([{"name": "big", "records": big}, {"name": "small", "records": small, "weight": 3}],
                                 strategy="proportional", seed=1)
    c = Counter(r["metadata"]["mix_source"] for r in mixed)
    assert c == {"big": 90, "small": 30} and summary["sources"][1]["repeats"] == 20
    again, _ = mix_sources([{"name": "big", "records": big}, {"name": "small", "records": small, "weight": 3}],
                           strategy="proportional", seed=1)
    assert again == mixed
    train, info = add_replay(big, small, 0.1, seed=0)
    assert sum(1 for r in train if r["metadata"].get("replay")) == 10 == info["rows"]
    with pytest.raises(Exception, match="different kinds"):
        mix_sources([{"name": "a", "records": big}, {"name": "b", "records": [chat("q", "a")]}])


def test_chunking_with_the_real_tokenizer(tokenizer):
    docs = ["The first document. " * 30, "A second, shorter one."]
    ids = [i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    chunks = chunk_texts(docs, tokenizer, chunk_size=32)
    assert [i for c in chunks for i in c["input_ids"]] == ids
    assert all(len(c["input_ids"]) == 32 for c in chunks[:-1])
    ov = chunk_texts(docs, tokenizer, chunk_size=32, overlap=8)
    assert ov[1]["input_ids"][:8] == ov[0]["input_ids"][-8:]
    per_doc = chunk_texts(docs, tokenizer, chunk_size=32, pack=False, add_eos=False)
    assert per_doc[-1]["input_ids"] == tokenizer(docs[1], add_special_tokens=False)["input_ids"]


def _cfg(tmp_path, data: dict):
    import tunesmith

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({"data": data, "output_dir": "run"}), encoding="utf-8")
    return tunesmith.load_config(p)


def test_prepare_data_end_to_end(tmp_path, regs, tokenizer):
    from tunesmith.core.context import RunContext
    from tunesmith.core.data_ops import prepare_data

    rows = _alpaca_rows(60)
    rows += rows[:5]                                            # exact duplicates
    rows.append({"instruction": "Write to me", "output": "Mail jane@corp.example.com or call 555-201-3344 soon."})
    p = write_jsonl(tmp_path / "train.jsonl", rows)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write('{"instruction": "broken"\n')                  # unreadable
    write_jsonl(tmp_path / "general.jsonl", [{"text": "x"}])
    cfg = _cfg(tmp_path, {"path": "train.jsonl", "skip_invalid": True,
                          "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 42, "stratify": "category"}})
    out = tmp_path / "run" / "data"
    s = prepare_data(cfg, regs, out, RunContext(config=cfg, registries=regs, tokenizer=tokenizer))
    assert s["total"] == 67 and s["unreadable"] == 1 and s["valid"] == 61
    assert {c["name"]: c["rejected"] for c in s["cleaners"]}["exact_dedupe"] == 5
    assert s["splits"]["train"] + s["splits"]["validation"] + s["splits"]["test"] == 61
    assert s["cross_split_duplicates"] == 0
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl", "report.md", "report.json",
              "token_lengths.png"):
        assert (out / f).stat().st_size > 0, f
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r.get("cleaner", r["stage"]) for r in rejects) == {"exact_dedupe": 5, "load": 1}
    assert all("line" in r and "reason" in r for r in rejects)
    train = load_records(out / "train.jsonl", registries=regs)
    assert "[EMAIL]" in json.dumps([load_records(out / f"{s_}.jsonl", registries=regs) for s_ in
                                    ("train", "validation", "test")])
    # the report's token total matches the tokenizer on the kept rows
    kept = train + load_records(out / "validation.jsonl", registries=regs) + load_records(out / "test.jsonl", registries=regs)
    want = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for r in kept for m in r["messages"])
    assert s["tokens"]["total"] == want
    md = (out / "report.md").read_text()
    assert "| exact_dedupe | 66 | 61 | 5 |" in md and "valid ratio" in md
    # determinism: the same config gives the same files
    s2 = prepare_data(cfg, regs, tmp_path / "again", RunContext(config=cfg, registries=regs, tokenizer=tokenizer))
    assert (tmp_path / "again" / "train.jsonl").read_text().replace(str(tmp_path / "again"), "") == \
        (out / "train.jsonl").read_text().replace(str(out), "")
    assert s2["splits"] == s["splits"]


def test_prepare_data_sources_mixing_and_replay(tmp_path, regs, tokenizer):
    from tunesmith.core.context import RunContext
    from tunesmith.core.data_ops import prepare_data

    write_jsonl(tmp_path / "a.jsonl", _alpaca_rows(100))
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Different task {i} asks for a reply.",
                                        "output": f"This is the reply to the different task {i}."} for i in range(20)])
    write_jsonl(tmp_path / "general.jsonl", [{"messages": [
        {"role": "user", "content": f"General question {i} about the world?"},
        {"role": "assistant", "content": f"A general answer, number {i}, about the world."}]} for i in range(200)])
    cfg = _cfg(tmp_path, {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 2.0}],
                          "mixing": {"strategy": "proportional"}, "replay": {"path": "general.jsonl", "ratio": 0.2},
                          "cleaners": [{"name": "exact_dedupe"}]})
    s = prepare_data(cfg, regs, tmp_path / "out", RunContext(config=cfg, registries=regs, tokenizer=tokenizer))
    drawn = {x["name"]: x["drawn"] for x in s["mixing"]["sources"]}
    assert drawn == {"a.jsonl": 80, "b.jsonl": 32}
    assert s["replay"]["rows"] == 28 and s["splits"]["train"] == 140
    train = load_records(tmp_path / "out" / "train.jsonl", registries=regs)
    assert sum(1 for r in train if r["metadata"].get("replay")) == 28


def test_cli_clean_report_convert_split_mix(tmp_path, capsys, tokenizer, tiny_tokenizer_dir):
    rows = _alpaca_rows(40) + _alpaca_rows(3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    code, out, err = run_cli(capsys, "data", "clean", str(src), "-o", str(tmp_path / "clean.jsonl"), "--report",
                             str(tmp_path / "rep.md"), "--tokenizer", str(tiny_tokenizer_dir), "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["rows_in"] == 43 and s["kept"] == 40 and s["rejected"] == 3
    assert (tmp_path / "clean.rejects.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "rep.json").exists() and (tmp_path / "rep_token_lengths.png").exists()

    code, out, _ = run_cli(capsys, "data", "convert", str(tmp_path / "clean.jsonl"), "-o", str(tmp_path / "sg.json"),
                           "--to", "sharegpt", "--json")
    assert code == 0 and json.loads(out)["rows"] == 40
    assert json.loads((tmp_path / "sg.json").read_text())[0]["conversations"][0]["from"] == "human"

    code, out, _ = run_cli(capsys, "data", "split", str(tmp_path / "clean.jsonl"), "-o", str(tmp_path / "sp"),
                           "--stratify", "category", "--json")
    assert code == 0 and json.loads(out)["validation"] == 4

    code, out, _ = run_cli(capsys, "data", "inspect", str(src), "--json")
    info = json.loads(out)
    assert info["format"] == "alpaca" and info["rows"] == 43

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 1, "output": "y"}\n')
    code, out, _ = run_cli(capsys, "data", "validate", str(bad), "--json")
    assert code == 3 and json.loads(out)["problems"][0]["where"] == f"{bad}:2"

    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"sources": [{"path": "in.jsonl"}, {"path": "clean.jsonl", "weight": 0.5}],
                                            "mixing": {"strategy": "equal"}}}))
    code, out, err = run_cli(capsys, "data", "mix", str(cfg), "-o", str(tmp_path / "mixed.jsonl"), "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 40 + 20
