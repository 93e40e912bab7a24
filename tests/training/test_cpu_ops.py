"""One-node RMSNorm and SwiGLU for eager bf16 CPU training (core/cpu_ops.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _grads(fn: Any, *inputs: Any, seed: int = 0) -> tuple[Any, list]:
    import torch

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float32"])
def test_rmsnorm_node_is_transformers_formula(weight_dtype: str) -> None:
    """Forward bit-identical to LlamaRMSNorm in bf16 (weight bf16, or fp32 with the
    same promotion); the input gradient equals autograd's to bf16 rounding."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunesmith.core.cpu_ops import use_cpu_training_ops

    torch.manual_seed(0)
    ref = LlamaRMSNorm(96, eps=1e-5).train()
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.2)
    ref = ref.to(getattr(torch, weight_dtype)).requires_grad_(False)
    fused = LlamaRMSNorm(96, eps=1e-5).train().to(getattr(torch, weight_dtype)).requires_grad_(False)
    fused.weight.data.copy_(ref.weight)
    assert use_cpu_training_ops(fused) == 1
    x = (torch.randn(3, 7, 96) * 3).to(torch.bfloat16)
    y0, (g0,) = _grads(ref, x)
    y1, (g1,) = _grads(fused, x)
    assert torch.equal(y0, y1)
    torch.testing.assert_close(g1.float(), g0.float(), atol=2e-2, rtol=1e-2)
    assert (g1 == g0).float().mean() > 0.95  # the same bf16 values but for the odd last-bit rounding


def test_swiglu_node_is_silu_times_up() -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tunesmith.core.cpu_ops import _SwiGLU

    torch.manual_seed(0)
    gate, up = torch.randn(4, 9, 40).to(torch.bfloat16), torch.randn(4, 9, 40).to(torch.bfloat16)
    y0, g0 = _grads(lambda a, b: torch.nn.functional.silu(a) * b, gate, up)
    y1, g1 = _grads(_SwiGLU.apply, gate, up)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b.float(), a.float(), atol=1e-2, rtol=1e-2)
    conf = LlamaConfig(hidden_size=32, intermediate_size=48)
    mlp = LlamaMLP(conf).to(torch.bfloat16).train()
    from tunesmith.core.cpu_ops import use_cpu_training_ops

    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        want = mlp(x)
    assert use_cpu_training_ops(mlp) == 1
    assert torch.equal(mlp(x.requires_grad_()).detach(), want)


def test_only_llama_formula_modules_are_routed_and_others_fall_back() -> None:
    """A norm with another formula (Gemma's 1 + weight) is left alone; evaluation,
    no-grad, fp32 activations and a trainable norm weight use the module's own forward."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunesmith.core import cpu_ops

    class OtherNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: Any) -> Any:
            return x * (1.0 + self.weight)

    model = nn.Sequential(LlamaRMSNorm(8), OtherNorm())
    assert cpu_ops.use_cpu_training_ops(model) == 1 and "forward" not in vars(model[1])
    assert cpu_ops.use_cpu_training_ops(model) == 0  # idempotent
    calls = []
    real = cpu_ops._RMSNorm.apply
    cpu_ops._RMSNorm.apply = lambda *a: (calls.append(1), real(*a))[1]  # type: ignore[method-assign]
    try:
        norm = model[0].to(torch.bfloat16)
        x = torch.randn(2, 8).to(torch.bfloat16)
        norm.train()
        norm(x)  # trainable weight (full fine-tuning): falls back
        norm.weight.requires_grad_(False)
        norm(x)
        assert len(calls) == 1
        with torch.no_grad():
            norm(x)
        norm.eval()
        norm(x)
        norm.train()
        norm.float()(x.float())
        assert len(calls) == 1
    finally:
        cpu_ops._RMSNorm.apply = real  # type: ignore[method-assign]


def test_bf16_model_with_the_nodes_trains_like_without(tiny_model_dir: Path) -> None:
    """The tiny Llama in bf16 with LoRA: loss equal, adapter gradients within bf16 rounding."""
    import torch

    import tunesmith
    from tunesmith.core.cpu_ops import use_cpu_training_ops
    from tunesmith.core.models import load_from_dir
    from tunesmith.core.precision import cast_trainable_fp32

    lora = tunesmith.registry().peft_methods.get("lora")
    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for ops in (False, True):
        torch.manual_seed(0)
        model, _ = load_from_dir(tiny_model_dir, dtype=torch.bfloat16)
        model = lora.apply(model, lora.Options(r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                                               init_weights="gaussian"), None)
        cast_trainable_fp32(model)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        if ops:
            assert use_cpu_training_ops(model) == 2 * 2 + 1 + 2  # 2 layers x 2 norms, the final norm, 2 MLPs
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((float(out.loss.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-3)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=2e-3, rtol=5e-2, msg=k)
