"""The real server on a free loopback port: concurrent requests for two adapters and the base."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.export.conftest import make_run

PROMPTS = ["Hello there, my friend", "The weather today is", "Once upon a time"]
CHAT = [{"role": "user", "content": "What is 2 plus 3?"}]
N = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_run(root / "alpha", tiny_model_dir, seed=1),
            "beta": make_run(root / "beta", tiny_model_dir, seed=2)}


def _reference(base_dir: Path, adapter: Path | None) -> dict:
    """Greedy outputs of the base or ONE adapter alone, with plain transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(base_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter / "final")
    model.eval()

    def gen(ids):
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)

    out = {p: gen(tok(p)["input_ids"]) for p in PROMPTS}
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    out["<chat>"] = gen(tok(chat_text, add_special_tokens=False)["input_ids"])
    return out


def test_server_isolates_adapters_under_concurrency(tiny_model_dir: Path, two_adapters: dict[str, Path], tmp_path: Path) -> None:
    from tunesmith.serving.server import ModelServer, create_app

    refs = {"base": _reference(tiny_model_dir, None)}
    refs.update({n: _reference(tiny_model_dir, p) for n, p in two_adapters.items()})
    # the three really differ, otherwise the test could not see a mix-up
    assert len({json.dumps(r, sort_keys=True) for r in refs.values()}) == 3

    server = ModelServer.from_paths(tiny_model_dir, {n: p for n, p in two_adapters.items()})
    with _Server(create_app(server)) as url:
        # 64 requests at once, mixed over two adapters and the base, some streamed: the
        # batched engine runs them in shared forwards; each answer must be its model's alone
        kinds = [(m, p) for m in ("alpha", "beta", "base") for p in [*PROMPTS, "<chat>"]]
        jobs = [(*kinds[i % len(kinds)], i % 5 == 0) for i in range(64)]
        steps0 = server.engine.steps

        def call(job):
            model, prompt, stream = job
            with httpx.Client(base_url=url, timeout=120) as c:
                if prompt == "<chat>":
                    body = {"model": model, "messages": CHAT, "max_tokens": N, "temperature": 0, "stream": stream}
                    r = c.post("/v1/chat/completions", json=body)
                else:
                    body = {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0, "stream": stream}
                    r = c.post("/v1/completions", json=body)
                r.raise_for_status()
                if stream:
                    events = [json.loads(line[6:]) for line in r.text.splitlines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                    text = "".join(e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
                                   for e in events)
                    return job, text, {"model": events[0]["model"], "usage": {"completion_tokens": len(events)}}
                choice = r.json()["choices"][0]
                return job, choice["message"]["content"] if prompt == "<chat>" else choice["text"], r.json()

        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(call, jobs))
        assert len(results) == 64
        for (model, prompt, stream), text, body in results:
            assert text == refs[model][prompt], (model, prompt, stream)
            assert body["model"] == model and body["usage"]["completion_tokens"] >= 1
        assert server.engine.steps - steps0 < 64 * N / 4  # batched, not one request at a time

        with httpx.Client(base_url=url, timeout=60) as c:
            models = [m["id"] for m in c.get("/v1/models").json()["data"]]
            assert models == ["base", "alpha", "beta"]
            assert c.get("/health").json()["status"] == "ok"
            # streaming (server-sent events) gives the same text in pieces
            r = c.post("/v1/chat/completions", json={"model": "beta", "messages": CHAT, "max_tokens": N, "temperature": 0,
                                                     "stream": True})
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
            assert "".join(ch["delta"].get("content", "") for ch in chunks) == refs["beta"]["<chat>"]
            assert chunks[-1]["finish_reason"] in ("stop", "length") and len(chunks) > 2
            r = c.post("/v1/completions", json={"model": "gamma", "prompt": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = c.post("/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
            r = c.post("/v1/completions", json={"model": "alpha"})
            assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
            # unload one adapter at run time; the other keeps answering the same
            assert c.delete("/v1/adapters/beta").json()["unloaded"] is True
            assert c.post("/v1/completions", json={"model": "beta", "prompt": "x"}).status_code == 404
            r = c.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
            assert r.json()["choices"][0]["text"] == refs["alpha"][PROMPTS[0]]
            # load it again under a new name
            r = c.post("/v1/adapters", json={"name": "beta2", "path": str(two_adapters["beta"])})
            assert r.status_code == 200, r.text
            r = c.post("/v1/completions", json={"model": "beta2", "prompt": PROMPTS[1], "max_tokens": N, "temperature": 0})
            assert r.json()["choices"][0]["text"] == refs["beta"][PROMPTS[1]]
            assert c.post("/v1/adapters", json={"name": "../x", "path": str(two_adapters["beta"])}).status_code == 400
            assert c.post("/v1/adapters", json={"name": "nope", "path": str(tmp_path)}).status_code == 404
            # unloading every adapter leaves the plain base model
            c.delete("/v1/adapters/alpha")
            c.delete("/v1/adapters/beta2")
            r = c.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[2], "max_tokens": N, "temperature": 0})
            assert r.json()["choices"][0]["text"] == refs["base"][PROMPTS[2]]


def test_api_key(tiny_model_dir: Path) -> None:
    from tunesmith.serving.server import ModelServer, create_app

    server = ModelServer.from_paths(tiny_model_dir)
    with _Server(create_app(server, api_key="s3cret")) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        assert c.get("/health").status_code == 200


def test_registry_routing(tiny_model_dir: Path, two_adapters: dict[str, Path], tmp_path: Path) -> None:
    from tunesmith.model_registry.local import ModelRegistry
    from tunesmith.serving.server import ModelServer, create_app

    reg = ModelRegistry(tmp_path / "reg")
    reg.register(two_adapters["alpha"] / "final", version="v1")
    reg.register(two_adapters["beta"] / "final", version="v2")
    reg.promote("v1", "production")
    reg.promote("v2", "canary", share=0.3)
    server = ModelServer.from_paths(tiny_model_dir, registry=tmp_path / "reg")
    with _Server(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as c:
        seen = {}
        for i in range(12):
            r = c.post("/v1/completions", json={"model": "production", "prompt": "Hi", "max_tokens": 1, "user": f"u{i}"})
            seen[f"u{i}"] = r.json()["model"]
        assert seen == {u: reg.route(u) for u in seen}
        assert set(seen.values()) <= {"v1", "v2"}
