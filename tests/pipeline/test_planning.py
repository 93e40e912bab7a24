"""Planning tools: the recommendation rules and the estimates against measured models."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tunesmith.planning import (
    EXAMPLES,
    ModelShape,
    UseCase,
    activation_bytes,
    estimate,
    model_shape,
    recommend,
    samples_needed,
)


@pytest.mark.parametrize(
    "example,approach",
    [
        ("support-bot", "hybrid"),
        ("code-completion", "fine-tuning"),
        ("document-qa", "rag"),
        ("sentiment", "fine-tuning"),
        ("creative-writing", "prompting"),
    ],
)
def test_guide_examples(example: str, approach: str) -> None:
    assert recommend(EXAMPLES[example]).approach == approach


def test_scores_follow_the_rules() -> None:
    use = UseCase(data_size=1500, update_frequency="monthly", complexity="complex", needs_format=True, latency_ms=100)
    rec = recommend(use)
    assert rec.scores["fine-tuning"] == pytest.approx(0.2 + 0.1 + 0.2 + 0.15)
    assert rec.scores["rag"] == 0.0
    assert rec.scores["prompting"] == 0.0
    assert rec.approach == "fine-tuning"
    assert any("1,000" in r for r in rec.reasons["fine-tuning"])
    # capped at 1.0
    big = UseCase(data_size=50000, complexity="complex", needs_format=True, needs_tone=True)
    assert recommend(big).scores["fine-tuning"] == 1.0


def test_budget_is_used() -> None:
    rich = UseCase(data_size=20000, update_frequency="daily", complexity="complex", needs_format=True,
                   monthly_budget_usd=100000, model_size_b=7)
    poor = UseCase(**{**rich.__dict__, "monthly_budget_usd": 20})
    r1, r2 = recommend(rich), recommend(poor)
    assert r2.scores["fine-tuning"] < r1.scores["fine-tuning"]
    assert r2.budget["fine_tune_monthly_usd"] > 20
    assert any("over the $20 budget" in r for r in r2.reasons["fine-tuning"])
    # daily retraining costs 30x a monthly one
    assert r1.budget["fine_tune_runs_per_month"] == 30


def test_samples_needed() -> None:
    assert samples_needed("simple", "high") == 500
    assert samples_needed("complex", "low") == 10000
    assert samples_needed() == 2500


def _tiny_shape(tiny_model_dir):
    return model_shape(tiny_model_dir)


def test_param_count_and_lora_params_match_real_models(tiny_model_dir) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = _tiny_shape(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        pm = get_peft_model(m, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert shape.lora_params(4, targets) == trainable
    del torch


def test_default_model_shape_from_gguf() -> None:
    from tunesmith.testing import default_gguf_path

    shape = model_shape(default_gguf_path())
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate) == (576, 30, 9, 3, 1536)
    assert shape.vocab == 49152 and shape.tie_embeddings
    assert shape.params == 134_515_008  # SmolLM2-135M


def _train_step(model, batch: int, seq: int):
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model(input_ids=ids, labels=ids).loss


def test_static_memory_matches_the_tensors(tiny_model_dir) -> None:
    """Weights + gradients + Adam state after one step, counted byte for byte (fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = _tiny_shape(tiny_model_dir)
    est = estimate(shape=shape, samples=8, epochs=1, batch_size=2, seq_len=16, lora_r=4, precision="fp32")

    def measured(model) -> dict:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params)
        _train_step(model, 2, 16).backward()
        opt.step()
        return {
            "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer": sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step"),
        }

    full = measured(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    lora = measured(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")))
    GB = 1024**3
    for name, got in (("full", full), ("lora", lora)):
        m = est.methods[name].memory_gb
        for k in ("weights", "gradients", "optimizer"):
            assert m[k] == pytest.approx(got[k] / GB, abs=1e-4), (name, k)


def test_flops_match_a_counted_training_step(tiny_model_dir) -> None:
    """6*P*T + attention for full training, 4*P*T for LoRA, against torch's FLOP counter."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    shape = _tiny_shape(tiny_model_dir)
    b, s = 2, 64
    est = estimate(shape=shape, samples=b, epochs=1, batch_size=b, seq_len=s, lora_r=4, gradient_checkpointing=False)

    def counted(model) -> int:
        with FlopCounterMode(display=False) as fc:
            _train_step(model, b, s).backward()
        return fc.get_total_flops()

    full_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    lora_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager"),
                                LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    assert counted(full_model) == pytest.approx(est.methods["full"].flops, rel=0.1)
    assert counted(lora_model) == pytest.approx(est.methods["lora"].flops, rel=0.1)


def test_activation_estimate_against_saved_tensors(tiny_model_dir) -> None:
    """The activation formula against the bytes autograd actually keeps for backward."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    shape = _tiny_shape(tiny_model_dir)
    b, s = 2, 64
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _train_step(model, b, s)
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in seen.items() if ptr not in params)
    predicted = activation_bytes(shape, b, s, checkpointing=False, bytes_per_value=4)
    assert 0.5 < predicted / measured < 2.0, (predicted, measured)


def test_guide_formula_is_reported_and_estimates_are_ordered() -> None:
    est = estimate(params_b=7, samples=1000, epochs=3, batch_size=4, seq_len=2048)
    m = est.methods
    assert m["qlora"].total_gb < m["lora"].total_gb < m["full"].total_gb
    assert "A100-80GB" in m["lora"].fits_on and "RTX3090-24GB" not in m["full"].fits_on
    assert m["full"].flops > m["lora"].flops
    # the guide's time rule, 6*P*T/peak, is kept for comparison
    assert est.guide["time_hours_a100"] == pytest.approx(6 * est.params * est.tokens / 312e12 / 3600, rel=1e-3)


def test_cli_plan(tiny_model_dir) -> None:
    from tunesmith.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["plan", "recommend", "--example", "document-qa", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["approach"] == "rag"
    r = runner.invoke(cli, ["plan", "estimate", "--model", str(tiny_model_dir), "--samples", "10", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["params"] == ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text())).params
    r = runner.invoke(cli, ["plan", "estimate", "--params", "7"])
    assert r.exit_code == 0 and "lora" in r.output
