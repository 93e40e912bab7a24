"""Every PEFT method trains a few steps on the tiny model, saves, reloads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import losses_of

METHODS = {
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0}, 2e-2),
    "lora_rslora": ({"method": "lora", "r": 4, "alpha": 8, "use_rslora": True, "dropout": 0.0}, 2e-2),
    "qlora": ({"method": "qlora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0}, 2e-2),
    "dora": ({"method": "dora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-2),
    "ia3": ({"method": "ia3"}, 5e-2),
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 4, "projection_hidden": 32}, 1e-2),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4, "init_text": "Answer with a number"}, 1e-1),
    "bottleneck": ({"method": "bottleneck", "size": 16}, 1e-2),
    "full": ({"method": "full"}, 2e-3),
    "freeze": ({"method": "freeze", "top_n": 1, "unfreeze_every": 3}, 5e-3),
}


class Capture:
    """A lifecycle plugin that keeps the trained in-memory model."""

    def __init__(self) -> None:
        self.model = None
        self.steps: list[int] = []

    from tunesmith import hookimpl

    @hookimpl
    def after_step(self, run: Any, step: int, logs: dict) -> None:
        self.steps.append(step)

    @hookimpl
    def after_train(self, run: Any, result: dict) -> None:
        self.model = run.model


@pytest.mark.parametrize("key", list(METHODS))
def test_method_trains_saves_and_reloads(key: str, make_cfg: Any, tunesmith_plugin: Any) -> None:
    import torch

    import tunesmith
    from tunesmith.core.models import load_trained
    from tunesmith.core.session import train

    peft, lr = METHODS[key]
    cap = Capture()
    tunesmith_plugin(cap, "capture")
    cfg = make_cfg(name=key, peft=peft, training={"learning_rate": lr, "max_steps": 8, "batch_size": 8})
    regs = tunesmith.registry()
    result = train(cfg, regs)
    run = Path(result["run_dir"])
    assert result["steps"] == 8 and cap.steps == list(range(1, 9))
    losses = losses_of(run)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"{key}: loss did not go down: {losses}"
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["peft"]["method"] == peft["method"]
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert not list((run / "final").glob("*.bin")) and not list((run / "final").glob("*.pt"))
    if key == "freeze":
        # gradual unfreezing reached 1 + 8 // 3 = 3 blocks... capped at the tiny model's 2
        trained = cap.model.tunesmith_freeze["trained"]
        assert any("layers.0." in n for n in trained) and any("layers.1." in n for n in trained)

    model, tok, _ = load_trained(run, registries=regs)
    batch = tok(["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    trained_model = cap.model.eval()
    with torch.no_grad():
        got = model(**batch, use_cache=False).logits
        want = trained_model(**batch, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()  # qlora: on the same 4-bit base
    assert model.training is False


def test_lora_adapter_loads_with_plain_peft(make_cfg: Any, tunesmith_plugin: Any) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tunesmith
    from tunesmith.core.models import load_trained
    from tunesmith.core.session import train

    cfg = make_cfg(name="plain", training={"max_steps": 4})
    result = train(cfg, tunesmith.registry())
    final = Path(result["run_dir"]) / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.options.path)
    plain = PeftModel.from_pretrained(base, str(final)).eval()
    ours, tok, info = load_trained(final)
    ids = tok(["hello there, what is four plus four?"], return_tensors="pt")
    with torch.no_grad():
        a = plain(**ids).logits
        b = ours(**ids).logits
        ref = AutoModelForCausalLM.from_pretrained(cfg.model.options.path)(**ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, ref, atol=1e-4)  # the adapter changed the model
    merged, _, _ = load_trained(final, merge=True)
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, a, atol=1e-4)


def test_learning_rate_auto_rule() -> None:
    from tunesmith.core.session import auto_learning_rate

    assert auto_learning_rate("lora", 135_000_000, 5000)[0] == pytest.approx(2e-4)
    assert auto_learning_rate("qlora", 135_000_000, 500)[0] == pytest.approx(1.6e-4)
    assert auto_learning_rate("full", 70e9, 200_000)[0] == pytest.approx(1e-5 * 0.5 * 1.2)
    assert auto_learning_rate("ia3", 13e9, 5000)[0] == pytest.approx(1e-4 * 0.7)
    lr, why = auto_learning_rate("lora", 1e8, 10)
    assert "x0.8" in why and "lora" in why
