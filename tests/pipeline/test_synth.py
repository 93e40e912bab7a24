"""Synthetic data: both generator plugins, marking, and cleaning of generated rows."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunesmith.synth import clean_generated, generate_from_seeds, parse_example, synthesize

SEEDS = [
    {"messages": [{"role": "user", "content": f"Write a haiku about the colour {c}."},
                  {"role": "assistant", "content": f"A {c} morning hush. Leaves fall slowly to the ground. The day waits for us."}],
     "metadata": {"source": "seeds.jsonl", "line": i + 1}}
    for i, c in enumerate(["red", "blue", "green", "amber", "violet"])
]


class FakeOpenAI(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible server: deterministic answers from the prompt."""

    calls: list[dict] = []
    fail_first: int = 0

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Rewrite"):
            req = prompt.split("Request: ", 1)[1]
            if "violet" in req:
                answer = req  # the model failed to rephrase
            elif "amber" in req:
                answer = "Rewritten request: " + req.replace("Write a haiku", "Compose a haiku") + " Mail it to jo@example.com."
            else:
                answer = '"' + req.replace("Write a haiku", "Compose a haiku") + '"'
        else:
            n = len(type(self).calls)
            answer = ("Sure!\n### Instruction\nWrite a haiku about rain number %d.\n### Response\n"
                      "Soft rain on the roof. Puddles gather in the lane. The town falls asleep." % n) if n % 3 else "I cannot."
        out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    FakeOpenAI.calls = []
    FakeOpenAI.fail_first = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_clean_and_parse_helpers() -> None:
    assert clean_generated('Rewritten request: "Do X."\n\nSure, here is more') == "Do X."
    assert parse_example("junk\n### Instruction\nA?\n### Response\nB.\n### Instruction\nC") == ("A?", "B.")
    assert parse_example("no layout") is None


def test_openai_paraphrase_marks_and_cleans(fake_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_TEST_KEY", "sk-test")
    FakeOpenAI.fail_first = 2  # two 429s: the plugin retries
    out = synthesize(SEEDS, mode="paraphrase", generator="openai",
                     options={"base_url": fake_server, "api_key_env": "TS_TEST_KEY", "concurrency": 1})
    calls = FakeOpenAI.calls
    assert len(calls) == len(SEEDS) + 2
    assert all(c["path"] == "/v1/chat/completions" and c["auth"] == "Bearer sk-test" for c in calls)
    recs = out["records"]
    # violet came back unchanged: a failure, not a row
    assert [f["reason"] for f in out["failures"]] == ["identical to the original"]
    assert len(recs) == 4
    for r in recs:
        assert r["messages"][0]["content"].startswith("Compose a haiku")
        syn = r["metadata"]["synthetic"]
        assert syn["method"] == "paraphrase" and syn["generator"] == "openai"
        assert syn["parents"][0].startswith("seeds.jsonl:")
        # the answer is kept
        assert r["messages"][1]["content"].endswith("The day waits for us.")
    amber = next(r for r in recs if "amber" in r["messages"][0]["content"])
    # the PII cleaner ran over generated text
    assert "jo@example.com" not in amber["messages"][0]["content"] and "[EMAIL]" in amber["messages"][0]["content"]


def test_generated_duplicates_of_originals_are_rejected(fake_server: str) -> None:
    rows = SEEDS[:2] + [SEEDS[0]]  # the duplicate seed yields a duplicate paraphrase
    out = synthesize(rows, mode="paraphrase", generator="openai", options={"base_url": fake_server},
                     cleaners=["normalize", "exact_dedupe"], include_originals=True)
    assert out["summary"]["generated"] == 3 and out["summary"]["kept"] == 2
    assert any(x["cleaner"] == "exact_dedupe" for x in out["rejects"])
    # originals are kept beside the generated rows (the duplicate original is rejected too)
    assert sum("synthetic" not in r["metadata"] for r in out["records"]) == 2


def test_seeds_generation(fake_server: str, tunesmith_plugin) -> None:
    import tunesmith

    gen = tunesmith.registry().generators.get("openai")
    res = generate_from_seeds(SEEDS, gen, gen.Options(base_url=fake_server, concurrency=1), n=6, shots=2, seed=1)
    assert res.prompts == 6 and len(res.records) == 4 and len(res.failures) == 2
    prompt = FakeOpenAI.calls[0]["body"]["messages"][0]["content"]
    assert prompt.count("### Instruction") == 3  # two shots + the layout line
    r = res.records[0]
    assert r["messages"][0]["content"].startswith("Write a haiku about rain number")
    assert len(r["metadata"]["synthetic"]["parents"]) == 2


def test_openai_errors_are_one_line(fake_server: str) -> None:
    import tunesmith
    from tunesmith.core.errors import TunesmithError

    gen = tunesmith.registry().generators.get("openai")
    with pytest.raises(TunesmithError, match="cannot reach"):
        gen.generate(["x"], gen.Options(base_url="http://127.0.0.1:9/v1", max_retries=0), None)
    FakeOpenAI.fail_first = 5
    with pytest.raises(TunesmithError, match="HTTP 429 after 2 attempts"):
        gen.generate(["x"], gen.Options(base_url=fake_server, max_retries=1), None)


def test_local_generator_matches_plain_transformers(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunesmith

    gen = tunesmith.registry().generators.get("local")
    opts = gen.Options(model={"source": "hf", "path": str(tiny_model_dir)}, temperature=0, max_new_tokens=6, batch_size=2)
    prompts = ["Say hello.", "Name a colour, please, any colour you like."]
    got = gen.generate(prompts, opts, None)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for p, g in zip(prompts, got):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert g == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_cli_synth(fake_server: str, tmp_path: Path) -> None:
    from tunesmith.cli import cli

    src = tmp_path / "seeds.jsonl"
    src.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in SEEDS), encoding="utf-8")
    out = tmp_path / "para.jsonl"
    r = CliRunner().invoke(cli, ["synth", "paraphrase", str(src), "--generator", "openai", "--gen-set",
                                 f"base_url={fake_server}", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == summary["kept"] == 4
    assert all(row["metadata"]["synthetic"]["generator"] == "openai" for row in rows)
    rejects = [json.loads(line) for line in Path(summary["rejects"]).read_text().splitlines()]
    assert any(x["stage"] == "generate" for x in rejects)
