"""Loading and writing real files; every bad input gives file:line, never a traceback."""

from __future__ import annotations

import json

import pytest

from tunesmith.core.data import load_records, write_records
from tunesmith.core.errors import DataError

from .conftest import write_jsonl

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour.", "category": "a"},
    {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate French."},
]


def test_jsonl_alpaca_to_canonical(tmp_path, regs):
    p = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    recs = load_records(p, registries=regs)
    assert recs[0] == {
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}],
        "metadata": {"category": "a", "source": str(p), "line": 1},
    }
    # input after a blank line; system becomes a system message
    assert recs[1]["messages"] == [
        {"role": "system", "content": "You translate French."},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert recs[1]["metadata"]["line"] == 2


def test_json_array_has_line_numbers(tmp_path, regs):
    p = tmp_path / "a.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r) for r in ALPACA) + "\n]\n", encoding="utf-8")
    recs = load_records(p, registries=regs)
    assert [r["metadata"]["line"] for r in recs] == [2, 3]


def test_csv_and_parquet_and_datasets_folder(tmp_path, regs):
    import csv

    import datasets

    p = tmp_path / "a.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        for r in ALPACA:
            w.writerow({k: r.get(k, "") for k in ("instruction", "input", "output")})
    csv_recs = load_records(p, registries=regs)
    assert [r["metadata"]["line"] for r in csv_recs] == [2, 3]
    assert csv_recs[1]["messages"][0]["content"] == "Translate\n\nchat"

    write_records(csv_recs, tmp_path / "a.parquet")
    pq_recs = load_records(tmp_path / "a.parquet", registries=regs)
    assert [r["messages"] for r in pq_recs] == [r["messages"] for r in csv_recs]
    assert pq_recs[0]["metadata"]["row"] == 1

    ds = datasets.Dataset.from_list([{"text": "first document here"}, {"text": "second document"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    ds_recs = load_records(tmp_path / "ds", registries=regs)
    assert [r["text"] for r in ds_recs] == ["first document here", "second document"]


def test_txt_units(tmp_path, regs):
    p = tmp_path / "c.txt"
    p.write_text("Para one\nstill one\n\n\nPara two\n", encoding="utf-8")
    assert [r["text"] for r in load_records(p, registries=regs)] == ["Para one\nstill one", "Para two"]
    assert len(load_records(p, registries=regs, text_unit="line")) == 3
    assert len(load_records(p, registries=regs, text_unit="file")) == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_read_round_trip(tmp_path, regs, suffix):
    recs = load_records(write_jsonl(tmp_path / "a.jsonl", ALPACA), registries=regs)
    out = write_records(recs, tmp_path / f"out{suffix}")
    back = load_records(out, registries=regs)
    assert [r["messages"] for r in back] == [r["messages"] for r in recs]
    assert back[0]["metadata"]["category"] == "a"


BAD = [
    ("malformed", b'{"text": "ok"}\n{"text": "broken\n', 2, "malformed JSON"),
    ("wrong type", b'{"instruction": "a", "output": 5}\n', 1, "'output' must be a string, got integer"),
    ("missing field", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', 2, "missing field 'output'"),
    ("not utf-8", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    ("not an object", b'{"text": "ok"}\n[1, 2]\n', 2, "expected a JSON object, got list"),
]


@pytest.mark.parametrize("name,data,line,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_and_line(tmp_path, regs, name, data, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(data)
    fmt = "alpaca" if b"instruction" in data else "auto"
    with pytest.raises(DataError) as ei:
        load_records(p, registries=regs, format=fmt)
    assert str(ei.value).startswith(f"{p}:{line}: ")
    assert msg in str(ei.value)
    # with skip_invalid the row goes to the rejects with its line and reason
    rejects: list = []
    recs = load_records(p, registries=regs, format=fmt, skip_invalid=True, rejects=rejects)
    assert len(rejects) == 1 and rejects[0]["line"] == line and msg in rejects[0]["reason"]
    assert rejects[0]["stage"] == "load"
    assert len(recs) == data.count(b"\n") - 1


def test_empty_and_blank_files(tmp_path, regs):
    for name, data in [("e.jsonl", b""), ("b.jsonl", b"\n\n"), ("e.json", b"[]"), ("e.csv", b"a,b\n"), ("e.txt", b"  \n")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError, match="empty|no rows"):
            load_records(p, registries=regs)


def test_missing_and_unsupported(tmp_path, regs):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl", registries=regs)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "x.xml", registries=regs)


def test_json_and_csv_errors_have_lines(tmp_path, regs):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"text": "a"},\n{"text": "b",}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:3: malformed JSON"):
        load_records(p, registries=regs)
    c = tmp_path / "bad.csv"
    c.write_text("text\nfine row\n\"a\",\"extra\"\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{c}:3: 2 cells but the header has 1"):
        load_records(c, registries=regs)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from .conftest import run_cli

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": \n')
    code, out, err = run_cli(capsys, "data", "clean", str(p), "-o", str(tmp_path / "o.jsonl"))
    assert code == 3
    assert err.strip().count("\n") == 0 and f"{p}:2: malformed JSON" in err and "Traceback" not in err
