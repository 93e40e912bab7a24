"""FastDropout (16-bit CPU masks for adapter inputs): the rate, the scaling, the
gradient, seeding, and that the LoRA plugin installs it only where it applies."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_rate_scale_and_gradient(p: float) -> None:
    import torch

    from tunesmith.plugins.peft._dropout import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(1000, 2000, requires_grad=True)
    y = drop(x)
    kept = y.ne(0)
    n = kept.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma + 1 / 65536
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 5 * sigma / (1 - p) + 1e-4  # unbiased
    # the four 16-bit lanes of a random word are independent: kept rates per lane agree, no correlation
    lanes = kept.reshape(-1, 4).float()
    rates = lanes.mean(0)
    assert (rates - (1 - p)).abs().max() < 5 * (p * (1 - p) / (n / 4)) ** 0.5
    corr = torch.corrcoef(lanes.T)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 0.01
    # gradient is the same mask and scale
    g = torch.randn_like(x)
    y.backward(g)
    assert drop._scale == pytest.approx(1 / (1 - p), rel=1e-4)  # 1 / (1 - p quantised to 1/65536)
    assert torch.equal(x.grad, torch.where(kept, g, 0) * drop._scale)


def test_seeded_eval_and_non_float_behave_like_dropout() -> None:
    import torch

    from tunesmith.plugins.peft._dropout import FastDropout

    drop = FastDropout(0.1).train()
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b)  # the global generator drives it (seed + RNG checkpoints work)
    assert not torch.equal(a, drop(x))
    assert torch.equal(drop.eval()(x), x)
    assert drop.train()(x.bfloat16()).dtype == torch.bfloat16
    assert isinstance(drop, torch.nn.Dropout) and "16-bit" in repr(drop)


def test_lora_plugin_installs_it_and_the_adapter_is_unchanged(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    import tunesmith
    from tunesmith.core.models import load_from_dir
    from tunesmith.plugins.peft._dropout import FastDropout

    lora = tunesmith.registry().peft_methods.get("lora")
    counts = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model, _ = load_from_dir(tiny_model_dir, dtype=torch.float32)
        opts = lora.Options(r=4, alpha=8, dropout=0.1, target_modules="all-linear", fast_dropout=fast)
        model = lora.apply(model, opts, None)
        counts[fast] = sum(isinstance(m, FastDropout) for m in model.modules())
        if fast:
            lora.save(model, tmp_path / "a")
            base, _ = load_from_dir(tiny_model_dir, dtype=torch.float32)
            back = PeftModel.from_pretrained(base, str(tmp_path / "a"))
            ids = torch.tensor([[1, 5, 9, 13]])
            model.eval()
            torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    n_linear = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert counts == {True: n_linear, False: 0} and n_linear > 0
    # no dropout: nothing to replace
    model, _ = load_from_dir(tiny_model_dir, dtype=torch.float32)
    model = lora.apply(model, lora.Options(r=4, dropout=0.0, target_modules="all-linear"), None)
    assert not any(isinstance(m, FastDropout) for m in model.modules())


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpointed blocks re-run their forward in backward; the masks must repeat
    (torch restores the CPU RNG state), so gradients equal those without checkpointing."""
    import torch

    import tunesmith
    from tunesmith.core.models import load_from_dir

    from tunesmith.plugins.peft._dropout import FastDropout

    calls = []
    forward = FastDropout.forward
    monkeypatch.setattr(FastDropout, "forward", lambda self, x: (calls.append(1), forward(self, x))[1])
    lora = tunesmith.registry().peft_methods.get("lora")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])
    grads, counts = [], []
    for checkpointing in (False, True):
        calls.clear()
        torch.manual_seed(0)
        model, _ = load_from_dir(tiny_model_dir, dtype=torch.float32)
        model = lora.apply(model, lora.Options(r=4, dropout=0.3, target_modules="all-linear", init_weights=False), None)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        counts.append(len(calls))
    assert counts[0] > 0 and counts[1] == 2 * counts[0]  # checkpointing really re-ran the blocks
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)
