"""Rule rewards against hand-computed values, the reward-model reward against a direct
forward pass, and the plugin contract (a third-party reward registers and is used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from tunesmith.core.errors import ConfigError, DataError


def _score(name: str, completions: list[str], rows: list[dict] | None = None, context: object = None, **opts: object) -> list[float]:
    plugin = tunesmith.registry().reward_functions.get(name)
    options = plugin.Options.model_validate(opts)
    rows = rows or [{} for _ in completions]
    return plugin.score(["q"] * len(completions), completions, rows, options, context)


def test_exact_match_modes_and_normalisation() -> None:
    rows = [{"answer": "Paris"}, {"answer": "Paris"}, {"metadata": {"answer": ["4", "four"]}}, {"answer": "Paris"}]
    comps = ["  paris. ", "The capital is Paris", "Four!", "Lyon"]
    assert _score("exact_match", comps, rows) == [1.0, 0.0, 1.0, 0.0]
    assert _score("exact_match", comps, rows, mode="contains") == [1.0, 1.0, 1.0, 0.0]
    assert _score("exact_match", ["paris"], [{"answer": "Paris"}], normalize=False) == [0.0]
    with pytest.raises(DataError, match="needs 'answer'"):
        _score("exact_match", ["x"], [{"prompt": []}])


def test_regex_format() -> None:
    comps = ["Answer: 42", "answer: 42", "The answer: 42", "Answer: forty"]
    assert _score("regex", comps, pattern=r"Answer: \d+", mode="match") == [1.0, 0.0, 0.0, 0.0]
    assert _score("regex", comps, pattern=r"Answer: \d+", mode="search", ignore_case=True) == [1.0, 1.0, 1.0, 0.0]
    assert _score("regex", ["Answer: 42  "], pattern=r"Answer: \d+", mode="fullmatch") == [1.0]
    with pytest.raises(Exception, match="regular expression"):
        tunesmith.registry().reward_functions.get("regex").Options.model_validate({"pattern": "(unclosed"})


def test_json_valid_with_required_keys() -> None:
    comps = ['{"a": 1, "b": 2}', 'Sure: ```json\n{"a": 1}\n```', "{a: 1}", '[1, 2]', 'text {"b": 3} more']
    assert _score("json_valid", comps) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert _score("json_valid", comps, required_keys=["a", "b"]) == [1.0, 0.75, 0.0, 0.5, 0.75]
    assert _score("json_valid", ['x {"a": 1}'], extract=False) == [0.0]


def test_length_bounds_and_linear_decay() -> None:
    comps = ["one two three", "one", "one two three four five six seven eight", ""]
    # words, [2, 4]: 3 in, 1 is 1 below (tolerance = min = 2 -> 0.5), 8 is 4 above (tolerance 4 -> 0), 0 is 2 below -> 0
    assert _score("length", comps, min=2, max=4) == [1.0, 0.5, 0.0, 0.0]
    assert _score("length", ["abcdefghij"], unit="chars", max=5, tolerance=10) == [0.5]
    with pytest.raises(Exception, match="below min"):
        tunesmith.registry().reward_functions.get("length").Options.model_validate({"min": 5, "max": 2})


def test_length_in_tokens_uses_the_tokenizer(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from tunesmith.core.context import RunContext

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "Hello there, general Kenobi"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    ctx = RunContext(tokenizer=tok)
    assert _score("length", [text], context=ctx, unit="tokens", max=n) == [1.0]
    assert _score("length", [text], context=ctx, unit="tokens", max=n - 1, tolerance=2) == [0.5]


def test_keywords_modes() -> None:
    comps = ["Red and BLUE", "green", "nothing"]
    assert _score("keywords", comps, words=["red", "blue"]) == [1.0, 0.0, 0.0]
    assert _score("keywords", ["red only"], words=["red", "blue"]) == [0.5]
    assert _score("keywords", comps, words=["red", "green"], mode="any") == [1.0, 1.0, 0.0]
    assert _score("keywords", comps, words=["red", "blue"], mode="none") == [0.0, 1.0, 1.0]
    assert _score("keywords", ["Red"], words=["red"], case_sensitive=True) == [0.0]


def test_reward_model_reward_matches_a_direct_forward(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}]}, {"prompt": [{"role": "user", "content": "Name a colour."}]}]
    comps = ["Hello! How can I help?", "Blue"]
    got = _score("reward_model", comps, rows, path=str(tmp_path / "rm"), batch_size=1)
    want = []
    for row, c in zip(rows, comps):
        text = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
        with torch.no_grad():
            want.append(float(rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] != pytest.approx(got[1])
    # batched (padded) scoring agrees with one-at-a-time scoring
    assert _score("reward_model", comps, rows, path=str(tmp_path / "rm"), batch_size=2) == pytest.approx(want, abs=1e-4)


def test_prompts_from_several_row_shapes(tmp_path: Path) -> None:
    from tunesmith.core.rewards import load_prompts, prompt_text

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3", "topic": "maths"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = tunesmith.validate_config({"data": {"path": str(path)}, "objective": {"name": "grpo", "system_prompt": "Be brief."}})
    got = load_prompts(cfg, cfg.objective.options)
    assert [r["answer"] for r in got] == ["4", "Paris", "3"]
    assert [prompt_text(r) for r in got] == ["What is 2+2?", "Capital of France?", "Add\n\n1 and 2"]
    assert all(r["prompt"][0] == {"role": "system", "content": "Be brief."} for r in got)
    assert got[2]["topic"] == "maths" and got[1]["_row"] == 2
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        load_prompts(cfg, cfg.objective.options)


def test_third_party_reward_plugin_is_used(tunesmith_plugin, tmp_path: Path) -> None:
    from tunesmith import hookimpl
    from tunesmith.core.rewards import RewardSet

    class Shouty:
        name = "shouty"
        description = "share of upper-case letters"

        def score(self, prompts, completions, rows, options, context):  # noqa: ANN001, ANN201
            return [sum(ch.isupper() for ch in c) / max(1, sum(ch.isalpha() for ch in c)) for c in completions]

    class Plugin:
        @hookimpl
        def register_reward_functions(self, register):  # noqa: ANN001, ANN201
            register(Shouty())

    tunesmith_plugin(Plugin(), "shouty-plugin")
    regs = tunesmith.registry()
    cfg = tunesmith.validate_config(
        {"objective": {"name": "grpo", "rewards": [{"name": "shouty", "weight": 2.0}, {"name": "length", "max": 1, "weight": 0.5}]}},
        registries=regs,
    )
    total, per = RewardSet(cfg, cfg.objective.options, regs, None).score(["p", "p"], ["AB", "ab cd"], [{}, {}])
    assert per == {"shouty": [1.0, 0.0], "length": [1.0, 0.0]}
    assert total == [2.5, 0.0]
    with pytest.raises(ConfigError, match="unknown reward function 'shoutey'"):
        tunesmith.validate_config({"objective": {"name": "grpo", "rewards": [{"name": "shoutey"}]}}, registries=regs)
