"""The five formats: detection, validation, conversion round trips (hypothesis), rendering."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.core.data import (
    convert_records, detect_format, from_canonical, load_records, to_canonical, write_records,
)
from tunesmith.core.errors import DataError

from .conftest import write_jsonl

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)
nonempty = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def msgs_strategy(with_system: bool = True):
    turn = st.tuples(nonempty, nonempty).map(
        lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])
    body = st.lists(turn, min_size=1, max_size=4).map(lambda ts: [m for t in ts for m in t])
    if not with_system:
        return body
    return st.tuples(st.one_of(st.none(), nonempty), body).map(
        lambda t: ([{"role": "system", "content": t[0]}] if t[0] else []) + t[1])


def fmt(regs, name):
    return regs.data_formats.get(name)


@SETTINGS
@given(msgs=msgs_strategy())
def test_chat_round_trips_messages_sharegpt(regs, msgs):
    rec = {"messages": msgs, "metadata": {}}
    for name in ("messages", "sharegpt"):
        f = fmt(regs, name)
        row = from_canonical(rec, f)
        assert f.detect(row) and f.validate(row) == []
        assert to_canonical(row, f) == rec
        # and row -> canonical -> row is the identity too
        assert from_canonical(to_canonical(row, f), f) == row


@SETTINGS
@given(instruction=nonempty, inp=text, output=nonempty, system=st.one_of(st.none(), nonempty))
def test_alpaca_to_chat_and_back(regs, instruction, inp, output, system):
    a = fmt(regs, "alpaca")
    row = {"instruction": instruction, "input": inp, "output": output, **({"system": system} if system else {})}
    rec = to_canonical(row, a)
    user = rec["messages"][-2]["content"]
    assert user == (f"{instruction}\n\n{inp}" if inp else instruction)
    # canonical -> alpaca -> canonical is lossless (the input is part of the user turn)
    assert to_canonical(from_canonical(rec, a), a) == rec
    # and alpaca -> messages -> alpaca -> canonical keeps the conversation
    m = fmt(regs, "messages")
    assert to_canonical(from_canonical(to_canonical(from_canonical(rec, m), m), a), a) == rec


@SETTINGS
@given(prompt=nonempty, chosen=nonempty, rejected=nonempty, lists=st.booleans())
def test_preference_round_trips(regs, prompt, chosen, rejected, lists):
    p = fmt(regs, "preference")
    if lists:
        row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": prompt}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    assert p.detect(row) and p.validate(row) == []
    rec = to_canonical(row, p)
    assert rec["chosen"] == [{"role": "assistant", "content": chosen}]
    assert from_canonical(rec, p) == row


@SETTINGS
@given(t=nonempty)
def test_text_round_trip(regs, t):
    f = fmt(regs, "text")
    assert from_canonical(to_canonical({"text": t}, f), f) == {"text": t}


def test_implicit_prompt_preference(regs):
    p = fmt(regs, "preference")
    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    rec = to_canonical(row, p)
    assert rec["prompt"] == [{"role": "user", "content": "q"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_detection_and_clear_errors(regs, tmp_path):
    assert detect_format([{"conversations": [{"from": "human", "value": "x"}]}], registries=regs).name == "sharegpt"
    assert detect_format([{"prompt": "p", "chosen": "a", "rejected": "b"}], registries=regs).name == "preference"
    assert detect_format([{"text": "t"}], registries=regs).name == "text"
    with pytest.raises(DataError) as ei:
        detect_format([{"question": "q", "answer": "a"}], registries=regs, source="f.jsonl")
    msg = str(ei.value)
    assert "unknown format" in msg and "fields seen: answer, question" in msg and "alpaca (instruction, output" in msg


class _Notes:
    """A third-party format that also claims rows with a `text` field."""

    name = "notes"
    description = "Notes with a text field."
    kind = "text"
    fields = ("text", "title")

    def detect(self, row):
        return "text" in row

    def to_canonical(self, row):
        return {"text": row["text"]}

    def from_canonical(self, record):
        return {"text": record["text"]}


class _NotesPlugin:
    from tunesmith import hookimpl

    @hookimpl
    def register_data_formats(self, register):
        register(_Notes())


def test_ambiguous_detection_names_the_candidates(tunesmith_plugin, tmp_path):
    import tunesmith

    tunesmith_plugin(_NotesPlugin(), "notes")
    regs2 = tunesmith.registry()
    p = write_jsonl(tmp_path / "n.jsonl", [{"text": "hello", "title": "t"}])
    with pytest.raises(DataError, match=r"ambiguous format: rows match notes, text \(fields seen: text, title\)"):
        load_records(p, registries=regs2)
    # naming the format settles it
    assert load_records(p, registries=regs2, format="notes")[0]["text"] == "hello"


def test_validation_messages(regs):
    m = fmt(regs, "messages")
    assert "'messages[0].role' must be one of" in m.validate({"messages": [{"role": "bot", "content": "x"}]})[0]
    assert m.validate({"messages": [{"role": "user", "content": "x"}]}) == ["'messages' has no assistant turn to learn from"]
    s = fmt(regs, "sharegpt")
    assert any("from" in p for p in s.validate({"conversations": [{"from": "alien", "value": "x"}]}))
    p = fmt(regs, "preference")
    assert p.validate({"chosen": "a", "rejected": "b"}) == ["missing field 'prompt' (needed when chosen/rejected are strings)"]


def test_conversion_that_cannot_hold_the_data_is_an_error(regs, tmp_path):
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
             "metadata": {"source": "x.jsonl", "line": 7}}
    with pytest.raises(DataError, match=r"x.jsonl:7: alpaca holds one user turn"):
        list(convert_records([multi], "alpaca", registries=regs))
    with pytest.raises(DataError, match="chat record cannot be written as preference"):
        list(convert_records([multi], "preference", registries=regs))


def test_convert_file_keeps_extra_fields(regs, tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                                             "system": "be nice", "id": 7}])
    recs = load_records(src, registries=regs)
    assert recs[0]["metadata"]["id"] == 7
    out = write_records(recs, tmp_path / "a.jsonl", format="alpaca", registries=regs)
    back = load_records(out, registries=regs)
    assert back[0]["messages"] == recs[0]["messages"] and back[0]["metadata"]["id"] == 7


def test_render_masks_all_but_assistant(regs, tokenizer):
    rec = load_records.__globals__["to_canonical"](
        {"instruction": "Say hi", "output": "Hello there!"}, fmt(regs, "alpaca"))
    out = fmt(regs, "alpaca").render(rec, tokenizer, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    learned = tokenizer.decode([i for i, l in zip(ids, labels) if l != -100])
    assert "Hello there!" in learned and "Say hi" not in learned
    assert out["truncated"] is False
    short = fmt(regs, "alpaca").render(rec, tokenizer, max_length=8)
    assert short["truncated"] and len(short["input_ids"]) <= 8
