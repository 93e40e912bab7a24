"""The ``openai`` generator: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, Ollama, OpenAI)."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class OpenAIGenerator:
    name = "openai"
    description = "Generate text through an OpenAI-compatible HTTP endpoint (/v1/chat/completions)."

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        base_url: str = Field("http://127.0.0.1:8000/v1", description="The API root, ending in /v1.")
        model: str = Field("default", description="The model name the endpoint serves.")
        api_key_env: str = Field(
            "OPENAI_API_KEY", description="Environment variable holding the API key (the key never goes in a config)."
        )
        max_tokens: int = Field(256, ge=1, description="Most tokens generated per prompt.")
        temperature: float = Field(0.8, ge=0.0, description="Sampling temperature.")
        top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
        system: str | None = Field(None, description="Optional system message sent before each prompt.")
        timeout_s: float = Field(60.0, gt=0, description="Timeout of one request in seconds.")
        max_retries: int = Field(3, ge=0, description="Retries on 429, 5xx and connection errors, with backoff.")
        concurrency: int = Field(4, ge=1, description="Requests in flight at once.")

    def _one(self, client: Any, prompt: str, options: "OpenAIGenerator.Options") -> str:
        import httpx

        from tunesmith.core.errors import TunesmithError

        msgs = ([{"role": "system", "content": options.system}] if options.system else []) + [
            {"role": "user", "content": prompt}
        ]
        body = {"model": options.model, "messages": msgs, "max_tokens": options.max_tokens,
                "temperature": options.temperature, "top_p": options.top_p}
        url = options.base_url.rstrip("/") + "/chat/completions"
        delay = 0.5
        for attempt in range(options.max_retries + 1):
            try:
                resp = client.post(url, json=body)
            except httpx.TransportError as exc:
                if attempt == options.max_retries:
                    raise TunesmithError(f"cannot reach {url}: {exc}", hint="check generator base_url") from None
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise TunesmithError(f"{url} answered without choices[0].message.content") from None
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    raise TunesmithError(f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}")
                if attempt == options.max_retries:
                    raise TunesmithError(f"{url} answered HTTP {resp.status_code} after {attempt + 1} attempts")
                retry_after = resp.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            time.sleep(delay)
            delay = min(delay * 2, 30)
        raise AssertionError("unreachable")

    def generate(self, prompts: list[str], options: "OpenAIGenerator.Options | None", context: Any) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        options = options or self.Options()
        headers = {}
        key = os.environ.get(options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with httpx.Client(timeout=options.timeout_s, headers=headers) as client:
            with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
                return list(pool.map(lambda p: self._one(client, p, options), prompts))


@hookimpl
def register_generators(register: Any) -> None:
    register(OpenAIGenerator())
