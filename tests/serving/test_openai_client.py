"""OpenAI compatibility, checked with the official ``openai`` Python client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import CHAT, PROMPTS, Reference, running, wait_until

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, adapter_runs: dict[str, Path]) -> Any:
    from tunesmith.serving.server import ModelServer, create_app

    server = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"], "beta": adapter_runs["beta"]},
                                    max_wait_ms=1, max_tokens_limit=64)
    with running(create_app(server, api_key="sk-test")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
    server.close()


def test_models(client: Any) -> None:
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def test_chat_answer_usage_and_finish_reason(client: Any, reference: Reference) -> None:
    r = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "alpha"
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.text("alpha", "<chat>", 8)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.ids("<chat>"))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_roles_are_validated(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "abracadabra"}])
    assert err.value.status_code == 400
    body = err.value.response.json()["error"]
    assert "wizard" in body["message"] and body["type"] == "invalid_request_error" and body["param"] == "messages.0.role"
    assert body["code"] == "invalid_request"
    # every OpenAI role is accepted (developer is treated as system)
    r = client.chat.completions.create(model="base", max_tokens=2, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Really."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"}])
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_stop(client: Any, reference: Reference) -> None:
    full = reference.text("beta", PROMPTS[2], 24)
    stop = full[6:10]
    r = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="beta", prompt="x", stop=["a", "b", "c", "d", "e"])


def test_n(client: Any, reference: Reference) -> None:
    r = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {reference.text("beta", "<chat>", 6)}
    assert r.usage.prompt_tokens == len(reference.ids("<chat>")) and r.usage.completion_tokens == 18
    sampled = [client.chat.completions.create(model="beta", messages=CHAT, max_tokens=8, temperature=1.0, seed=5, n=3)
               for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3  # seeded: reproducible; choices differ


def test_stream_with_usage(client: Any, reference: Reference) -> None:
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text("alpha", "<chat>", 10)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no usage chunk at all
    plain = list(client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in plain)
    assert "".join(c.choices[0].text for c in plain) == reference.text("alpha", PROMPTS[0], 5)


def test_completions_with_several_prompts_and_token_ids(client: Any, reference: Reference) -> None:
    r = client.completions.create(model="base", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == [reference.text("base", p, 4) for p in PROMPTS[:2]]
    assert r.usage.prompt_tokens == sum(len(reference.ids(p)) for p in PROMPTS[:2])
    r = client.completions.create(model="base", prompt=reference.ids(PROMPTS[1]), max_tokens=4, temperature=0)
    assert r.choices[0].text == reference.text("base", PROMPTS[1], 4)


def test_errors_have_openai_shape(client: Any, tiny_model_dir: Path) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gamma", prompt="x")
    assert err.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="alpha", messages=CHAT, logprobs=True)
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_rate_limit_is_429_with_retry_after(tiny_model_dir: Path, reference: Reference) -> None:
    import threading

    from tunesmith.serving.server import ModelServer, create_app

    server = ModelServer.from_paths(tiny_model_dir, max_batch_size=1, max_queue=1, max_wait_ms=0)
    try:
        with running(create_app(server)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            long = threading.Thread(target=lambda: c.completions.create(model="base", prompt="a", max_tokens=400))
            long.start()
            wait_until(lambda: server.stats()["running"] == 1, what="a running request")
            waiting = threading.Thread(target=lambda: c.completions.create(model="base", prompt="b", max_tokens=2))
            waiting.start()
            wait_until(lambda: server.stats()["queued"] == 1, what="a queued request")
            with pytest.raises(openai.RateLimitError) as err:
                c.completions.create(model="base", prompt="c", max_tokens=2)
            assert int(err.value.response.headers["retry-after"]) >= 1
            assert err.value.response.json()["error"]["code"] == "rate_limit_exceeded"
            long.join()
            waiting.join()
    finally:
        server.close()
