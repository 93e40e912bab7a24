"""Shared fixtures for the serving tests: two random LoRA adapters on the tiny model,
references computed with plain peft one request at a time, and a real uvicorn server
on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.export.conftest import make_run

PROMPTS = ["Hello there, my friend", "The weather today is", "Once upon a time in a land far away, there lived",
           "x", "What is 2 plus 3?"]
CHAT = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="session")
def adapter_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving-adapters")
    return {"alpha": make_run(root / "alpha", tiny_model_dir, seed=1),
            "beta": make_run(root / "beta", tiny_model_dir, seed=2),
            "gamma": make_run(root / "gamma", tiny_model_dir, seed=3)}


class Reference:
    """Greedy token ids of the base or ONE adapter alone: plain transformers + peft generate."""

    def __init__(self, base_dir: Path, runs: dict[str, Path]) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tunesmith.core.models import setup_tokenizer

        self.tok = setup_tokenizer(AutoTokenizer.from_pretrained(base_dir), padding_side="left")
        self.models: dict[str, Any] = {"base": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
        for name, run in runs.items():
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            self.models[name] = PeftModel.from_pretrained(base, run / "final").eval()
        self._cache: dict[tuple, list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        if prompt == "<chat>":
            text = self.tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]

    def tokens(self, model: str, prompt: str, max_tokens: int) -> list[int]:
        key = (model, prompt, max_tokens)
        if key not in self._cache:
            import torch

            x = torch.tensor([self.ids(prompt)])
            with torch.inference_mode():
                out = self.models[model].generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                                  do_sample=False, eos_token_id=self.tok.eos_token_id,
                                                  pad_token_id=self.tok.pad_token_id)
            self._cache[key] = out[0, x.shape[1]:].tolist()
        return self._cache[key]

    def text(self, model: str, prompt: str, max_tokens: int) -> str:
        return self.tok.decode(self.tokens(model, prompt, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, adapter_runs: dict[str, Path]) -> Reference:
    ref = Reference(tiny_model_dir, adapter_runs)
    # the three really differ, otherwise no test could see a mix-up
    outs = {m: tuple(ref.tokens(m, PROMPTS[0], 8)) for m in ("base", "alpha", "beta", "gamma")}
    assert len(set(outs.values())) == 4
    return ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
