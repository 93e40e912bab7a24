"""EWC and L2-SP against direct computations from their definitions, on a tiny real model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tunesmith.core.context import RunContext  # noqa: E402
from tunesmith.plugins.losses.ewc import (  # noqa: E402
    EWC,
    EWCOptions,
    estimate_fisher,
    ewc_penalty,
    load_anchor_from,
    snapshot,
    trainable_parameters,
)
from tunesmith.plugins.losses.l2_sp import L2SP, L2SPOptions, l2_penalty  # noqa: E402


def _batches(tok, n_batches=3, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(10, 2000, (bs, 9), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt part the loss ignores
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _load(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _direct_fisher(model, batches):
    """F_i = mean over batches of (d loss / d theta_i)^2, with transformers' own loss."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in batches:
        loss = model(**b).loss  # HF shifts labels itself and ignores -100
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g.double() ** 2
    return {n: a / len(batches) for n, a in zip(names, acc)}


def _perturb(model, scale=0.01, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_ewc_penalty_equals_definition_full_finetuning(tiny_model_dir) -> None:
    model, tok = _load(tiny_model_dir)
    batches = _batches(tok)
    anchor = snapshot(model)
    fisher = estimate_fisher(model, batches)
    direct = _direct_fisher(model, batches)
    assert set(fisher) == set(direct)
    for n in direct:
        torch.testing.assert_close(fisher[n].double(), direct[n], rtol=1e-4, atol=1e-10)
    assert sum(float(f.sum()) for f in fisher.values()) > 0

    _perturb(model)
    penalty = ewc_penalty(model, fisher, anchor)
    expected = sum(
        (direct[n] * (p.detach().double() - anchor[n].double()) ** 2).sum() for n, p in model.named_parameters()
    )
    assert float(penalty) == pytest.approx(float(expected), rel=1e-4)
    assert float(penalty) > 0
    # the gradient of the penalty is 2 F (theta - theta*)
    penalty.backward()
    n, p = next((n, p) for n, p in model.named_parameters() if "q_proj" in n)
    torch.testing.assert_close(p.grad, 2 * fisher[n] * (p.detach() - anchor[n]), rtol=1e-4, atol=1e-12)


def test_ewc_with_lora(tiny_model_dir, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = _load(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    _perturb(model, scale=0.05)  # lora_B starts at 0; move it so lora_A gets gradient too
    batches = _batches(tok)
    anchor = snapshot(model)
    assert anchor and all("lora_" in n for n in anchor)
    fisher = estimate_fisher(model, batches)
    direct = _direct_fisher(model, batches)
    for n in direct:
        torch.testing.assert_close(fisher[n].double(), direct[n], rtol=1e-4, atol=1e-12)
    _perturb(model, scale=0.01, seed=3)
    expected = sum((direct[n] * (p.detach().double() - anchor[n].double()) ** 2).sum()
                   for n, p in model.named_parameters() if p.requires_grad)
    assert float(ewc_penalty(model, fisher, anchor)) == pytest.approx(float(expected), rel=1e-4)

    # a previous run's adapter as the anchor: keys saved without the adapter name are matched
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_anchor_from(tmp_path / "adapter", model)
    assert set(loaded) == set(anchor)
    for n, p in trainable_parameters(model).items():
        torch.testing.assert_close(loaded[n], p.detach().float())


def test_l2_sp_equals_definition(tiny_model_dir) -> None:
    model, _ = _load(tiny_model_dir)
    anchor = snapshot(model)
    _perturb(model, scale=0.02)
    expected = sum(((p.detach().double() - anchor[n].double()) ** 2).sum() for n, p in model.named_parameters())
    assert float(l2_penalty(model, anchor)) == pytest.approx(float(expected), rel=1e-5)


def test_plugins_store_and_reuse_state_on_resume(tiny_model_dir, tmp_path) -> None:
    """The anchor (and for EWC the Fisher) lands in the run dir and a resumed run reads it back."""
    from tunesmith.plugins.losses.ewc import load_tensors, save_tensors

    model, tok = _load(tiny_model_dir)
    ctx = RunContext(run_dir=tmp_path / "run", tokenizer=tok)
    L2SP().setup(model, L2SPOptions(), ctx)
    stored = load_tensors(tmp_path / "run" / "l2_sp" / "anchor.safetensors")
    assert set(stored) == set(trainable_parameters(model))

    # EWC on resume: Fisher and anchor come from RUN/ewc/, not from the (moved) model
    fisher = estimate_fisher(model, _batches(tok))
    anchor = snapshot(model)
    save_tensors(tmp_path / "run" / "ewc" / "fisher.safetensors", fisher)
    save_tensors(tmp_path / "run" / "ewc" / "anchor.safetensors", anchor)
    _perturb(model, scale=0.01)
    resumed = RunContext(run_dir=tmp_path / "run", tokenizer=tok, state={"resume": True})
    loss, _ = EWC().compute(model, None, EWCOptions(data="unused-on-resume.jsonl"), resumed)
    assert float(loss) == pytest.approx(float(ewc_penalty(model, fisher, anchor)), rel=1e-6)
    assert float(loss) > 0


def test_ewc_without_reference_data_is_a_config_error(tiny_model_dir, tmp_path) -> None:
    from tunesmith.core.errors import ConfigError

    model, tok = _load(tiny_model_dir)
    with pytest.raises(ConfigError, match="reference data"):
        EWC().setup(model, EWCOptions(), RunContext(run_dir=tmp_path, tokenizer=tok))
