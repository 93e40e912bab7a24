"""LossBatch.token_loss: the output head at the labelled positions only gives the
model's own token-weighted loss and the same gradients, for plain, LoRA and
prompt-tuned models, with and without label smoothing and num_items_in_batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import varied_chat


def _batch(tok: Any, n: int = 4) -> dict:
    from tunesmith.core.render import TokenCollator, render_chat

    exs = [render_chat(tok, r["messages"], max_length=64) for r in varied_chat(n)]
    return TokenCollator(tok.pad_token_id)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs])


def _model(tiny_model_dir: Path, peft: str | None) -> tuple[Any, Any]:
    import torch

    from tunesmith.core.models import load_from_dir

    torch.manual_seed(0)
    model, tok = load_from_dir(tiny_model_dir, dtype=torch.float32)
    if peft == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules="all-linear", init_lora_weights=False))
    elif peft == "prompt":
        from peft import PromptTuningConfig, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    return model, tok


def _grads(model: Any) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("peft", [None, "lora", "prompt"])
@pytest.mark.parametrize("num_items", [None, 57])
def test_token_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir: Path, peft: str | None, num_items: int | None) -> None:
    import torch

    from tunesmith.core.labelled import output_head
    from tunesmith.core.training import LossBatch

    model, tok = _model(tiny_model_dir, peft)
    model.train()
    batch = _batch(tok)
    assert batch["labels"].eq(-100).float().mean() > 0.5  # mostly prompt: the path has work to skip

    ref = LossBatch(batch)
    ref.num_items_in_batch = torch.tensor(num_items) if num_items else None
    expected = ref.forward(model).loss
    expected.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)

    fast = LossBatch(batch)
    fast.num_items_in_batch = torch.tensor(num_items) if num_items else None
    got = fast.token_loss(model)
    got.backward()
    g = _grads(model)
    # prompt tuning prepends virtual tokens: the full forward runs (and is reused)
    assert (fast._outputs is None) == (fast._token_loss is not None) == (peft != "prompt") == (output_head(model) is not None)
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert g.keys() == g_ref.keys() and g
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-6, rtol=1e-5, msg=k)


def test_label_smoothing_matches_the_full_logits(tiny_model_dir: Path) -> None:
    import torch
    import torch.nn.functional as F

    from tunesmith.core.training import LossBatch

    model, tok = _model(tiny_model_dir, "lora")
    batch = _batch(tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=0.1)
        got = LossBatch(batch).token_loss(model, label_smoothing=0.1)
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_a_head_applied_to_other_shapes_falls_back(tiny_model_dir: Path) -> None:
    """If the head sees hidden states of another shape, the plain logits are used."""
    import torch

    from tunesmith.core.labelled import labelled_forward

    model, tok = _model(tiny_model_dir, None)
    batch = _batch(tok)
    short = {"input_ids": batch["input_ids"][:, :-2], "attention_mask": batch["attention_mask"][:, :-2]}
    with torch.no_grad():
        out = labelled_forward(model, short, batch["labels"])
    assert out is None  # logits shorter than the labels: the caller runs the full forward
