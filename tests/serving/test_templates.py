"""The server renders prompts exactly as training did (issue 14, serving).

Every adapter folder training saves carries its tokenizer with the run's chat
template; the server uses that adapter's own template for /v1/chat/completions on
it, stops on the template's end-of-turn token, and grows the shared base's
embeddings when the run added tokens. Checked against what training itself
rendered (a spy on :func:`tunesmith.core.render._template` while it trains), what
``tunesmith eval`` rendered, and greedy answers of plain peft with that rendering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

TRAINING = {"max_steps": 2, "batch_size": 2, "max_length": 96, "save_steps": 0, "eval_steps": 0, "report_to": [],
            "early_stopping": None, "gradient_checkpointing": False, "precision": "fp32", "learning_rate": 2e-2,
            "warmup_ratio": 0.0}
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"


def _cli(args: list[str]) -> None:
    from tunesmith.cli import main

    try:
        main(args)
    except SystemExit as exc:  # main exits only on failure
        assert exc.code in (0, None), f"tunesmith {' '.join(args)} exited {exc.code}"


class RenderSpy:
    """Records every chat rendering tunesmith.core.render makes: ``(messages,
    add_generation_prompt) -> text``. Training renders each conversation's prompt
    prefix (the messages before an assistant turn, with the generation prompt) to
    find the labels: those are the prompts the model learned to answer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from tunesmith.core import render

        self.seen: dict[tuple[str, bool], str] = {}
        original = render._template

        def spy(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
            text = original(tokenizer, messages, add_generation_prompt=add_generation_prompt)
            self.seen[(json.dumps(messages, sort_keys=True), add_generation_prompt)] = text
            return text

        monkeypatch.setattr(render, "_template", spy)

    def prompts(self) -> list[tuple[list[dict], str]]:
        """(messages, the text training rendered for them with the generation prompt)."""
        return [(json.loads(k), t) for (k, gen), t in self.seen.items() if gen and json.loads(k)]


def _train_cli(tmp_path: Path, base: Path, *, chat_template: str | None = None, evaluation: list | None = None) -> Path:
    cfg: dict[str, Any] = {"model": {"source": "hf", "path": str(base)}, "data": {"path": str(QUICKSTART)},
                           "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
                           "training": TRAINING, "evaluation": evaluation or [], "output_dir": str(tmp_path / "run")}
    if chat_template:
        cfg["chat_template"] = chat_template
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    _cli(["train", str(tmp_path / "c.yaml")])
    return tmp_path / "run"


def plain_peft(base_dir: Path, final: Path, messages: list[dict], max_new: int, *, eot: str | None = None,
               stop: tuple[str, ...] = ()) -> tuple[str, list[int], str]:
    """(prompt text, prompt ids, greedy answer) with plain transformers + peft and the
    adapter folder's own tokenizer and chat template; nothing from tunesmith."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tok) > base.get_input_embeddings().num_embeddings:  # the run added tokens
        base.resize_token_embeddings(len(tok), mean_resizing=False)
    model = PeftModel.from_pretrained(base, str(final)).eval()
    gen_eos = base.generation_config.eos_token_id
    eos = {tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))}
    if eot:
        eos.add(tok.convert_tokens_to_ids(eot))
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=sorted(e for e in eos if e is not None), pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    cuts = [answer.find(s) for s in stop if s in answer]
    return text, ids, answer[:min(cuts)] if cuts else answer


def _chat(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    import httpx

    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens,
                                                       "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_base_without_template_train_eval_and_serve_render_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_tokenizer_dir: Path) -> None:
    """A tiny base model whose tokenizer ships no chat template, trained with `tunesmith
    train` on the quickstart data (no chat_template key: the default for base models,
    alpaca); `tunesmith eval` and the server's chat endpoint render the prompts as
    training did, and the server's greedy answers equal plain peft's with them."""
    from tests.models.archs import build
    from tests.serving.conftest import running
    from tunesmith.core import evalset
    from tunesmith.plugins.chat_templates.alpaca import TEMPLATE, Alpaca
    from tunesmith.serving.server import ModelServer, create_app

    base = build("qwen2", tmp_path / "base", tok_dir=tiny_tokenizer_dir, chat_template=False)
    spy = RenderSpy(monkeypatch)
    run = _train_cli(tmp_path, base, evaluation=[{"name": "generation", "path": str(QUICKSTART), "limit": 2,
                                                  "max_new_tokens": 2}])
    trained = spy.prompts()
    assert trained and all(t.startswith("Below is an instruction") and t.endswith("### Response:\n") for _, t in trained)
    assert (run / "final" / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE

    evaluated: list[tuple[list[dict], str]] = []
    original = evalset.render_prompt

    def eval_spy(tokenizer: Any, messages: list[dict], **kw: Any) -> str:
        text = original(tokenizer, messages, **kw)
        evaluated.append(([dict(m) for m in messages], text))
        return text

    monkeypatch.setattr(evalset, "render_prompt", eval_spy)
    _cli(["eval", str(tmp_path / "c.yaml")])
    assert len(evaluated) == 4  # two rows, tuned and base

    server = ModelServer.from_paths(base, {"tuned": run}, max_wait_ms=1)
    try:
        # the server renders training's prompts and eval's prompts character for character
        for messages, text in trained[:8]:
            assert server.render_chat(messages, "tuned") == text
        for messages, text in evaluated:
            assert server.render_chat(messages, "tuned") == text
        codec = server.codec("tuned")
        assert codec.template == "alpaca" and "### Instruction:" in codec.stop
        assert codec.tokenizer.eos_token_id in codec.eos
        with running(create_app(server)) as url:
            for messages, _ in evaluated[:2] + trained[:2]:
                text, ids, answer = plain_peft(base, run / "final", messages, 8, stop=Alpaca.stop)
                assert server.encode_chat(messages, "tuned") == ids
                r = _chat(url, "tuned", messages, 8)
                assert r["usage"]["prompt_tokens"] == len(ids)
                assert r["choices"][0]["message"]["content"] == answer
            # the base model has no template of its own: chat on it still works (the default)
            r = _chat(url, "base", evaluated[0][0], 3)
            assert r["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        server.close()


def test_added_tokens_grow_the_base_and_stop_on_end_of_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_tokenizer_dir: Path, adapter_runs: dict[str, Path],
                                                            tiny_model_dir: Path, reference: Any) -> None:
    """A template the vocabulary lacks (llama3 on SmolLM2's tokenizer adds three
    tokens): the server grows the shared base to them, writes the adapter's trained
    rows, renders as training did, ends answers at <|eot_id|>, and a mixed batch of
    this adapter, another adapter and the base gives each its answer alone."""
    import threading

    from tests.serving.conftest import PROMPTS, running
    from tunesmith.serving.server import ModelServer, create_app

    spy = RenderSpy(monkeypatch)
    run = _train_cli(tmp_path, tiny_model_dir, chat_template="llama3")
    final = run / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["trainable_token_indices"] == {"embed_tokens": [49152, 49153, 49154]}
    trained = spy.prompts()
    assert trained and all("<|start_header_id|>assistant<|end_header_id|>" in t for _, t in trained)

    server = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"]}, max_wait_ms=300, max_batch_size=8)
    try:
        rows0 = server.vocab_rows()
        server.load_adapter("llama3", run)
        assert server.vocab_rows() == 49155 > rows0
        codec = server.codec("llama3")
        assert codec.template == "llama3" and codec.vocab == 49155 and server.codec("alpha").vocab == rows0
        assert codec.tokenizer.convert_tokens_to_ids("<|eot_id|>") in codec.eos
        for messages, text in trained[:8]:
            assert server.render_chat(messages, "llama3") == text
        messages = trained[0][0]
        _, ids, answer = plain_peft(tiny_model_dir, final, messages, 10, eot="<|eot_id|>")
        assert server.encode_chat(messages, "llama3") == ids
        # all three at once: one prefill, one mixed decode batch
        jobs = [("llama3", ids), ("alpha", reference.ids(PROMPTS[0])), ("base", reference.ids(PROMPTS[1]))]
        out: dict[str, Any] = {}

        def one(model: str, prompt: list[int]) -> None:
            out[model] = server.generate(model, prompt, max_tokens=10, temperature=0)

        threads = [threading.Thread(target=one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert out["llama3"].text == answer
        assert out["alpha"].text == reference.text("alpha", PROMPTS[0], 10)
        assert out["base"].text == reference.text("base", PROMPTS[1], 10)
        with running(create_app(server)) as url:  # the chat endpoint on that adapter uses its template
            r = _chat(url, "llama3", messages, 10)
        assert r["choices"][0]["message"]["content"] == answer and r["usage"]["prompt_tokens"] == len(ids)
        # unloading leaves the other models as they were
        server.unload_adapter("llama3")
        assert server.generate("base", reference.ids(PROMPTS[1]), max_tokens=10, temperature=0).text == \
            reference.text("base", PROMPTS[1], 10)
    finally:
        server.close()


@pytest.mark.slow
def test_default_model_with_a_named_template_serves_as_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model trained a few steps with `chat_template: chatml`, served: the
    server renders training's prompts and answers as plain peft does with them."""
    import tunesmith
    from tests.serving.conftest import running
    from tunesmith.core.session import train
    from tunesmith.serving.server import ModelServer, create_app

    cfg = {"model": {"source": "default"}, "chat_template": "chatml", "data": {"path": str(QUICKSTART)},
           "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "q_proj,v_proj", "dropout": 0.0},
           "training": {**TRAINING, "max_length": 64, "learning_rate": 1e-3}, "evaluation": [],
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    spy = RenderSpy(monkeypatch)
    tunesmith.reset_plugins()
    result = train(tunesmith.load_config(tmp_path / "c.yaml"))
    final = Path(result["output_path"])
    info = json.loads((final / "tunesmith.json").read_text())
    assert info["template"]["name"] == "chatml" and info["template"]["source"] == "config"
    trained = spy.prompts()
    assert trained and all(t.endswith("<|im_start|>assistant\n") for _, t in trained)

    server = ModelServer.from_paths("default", {"tuned": result["run_dir"]}, max_wait_ms=1)
    try:
        assert server.codec("tuned").template == "chatml"
        assert server.codec("tuned").tokenizer.convert_tokens_to_ids("<|im_end|>") in server.codec("tuned").eos
        for messages, text in trained[:8]:
            assert server.render_chat(messages, "tuned") == text
        messages = trained[0][0]
        _, ids, answer = plain_peft(Path(info["base_model_dir"]), final, messages, 6, eot="<|im_end|>")
        assert server.encode_chat(messages, "tuned") == ids
        with running(create_app(server)) as url:
            r = _chat(url, "tuned", messages, 6)
        assert r["choices"][0]["message"]["content"] == answer and r["usage"]["prompt_tokens"] == len(ids)
    finally:
        server.close()
