"""The fused LoRA training layer (plugins/peft/_fused.py), its dropped-position
sampler, and fp32 attention for bf16 CPU training steps (core/precision.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


def _lora_model(tiny_model_dir: Path, *, dtype: Any, dropout: float, fused: str, seed: int = 0) -> Any:
    import torch

    import tunesmith
    from tunesmith.core.models import load_from_dir
    from tunesmith.core.precision import cast_trainable_fp32

    lora = tunesmith.registry().peft_methods.get("lora")
    torch.manual_seed(seed)
    model, _ = load_from_dir(tiny_model_dir, dtype=dtype)
    opts = lora.Options(r=4, alpha=8, dropout=dropout, target_modules="all-linear", init_weights="gaussian", fused=fused)
    model = lora.apply(model, opts, None)
    cast_trainable_fp32(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the low-rank path count
            p.data.normal_(0, 0.1)
    return model.train()


def _loss_and_grads(model: Any, ids: Any, *, bf16: bool = False, seed: int = 5) -> tuple[float, dict]:
    import torch

    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _routed(model: Any) -> int:
    from tunesmith.plugins.peft._fused import _fused_forward

    return sum(getattr(vars(m).get("forward"), "__func__", None) is _fused_forward for m in model.modules())


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_fused_equals_peft_where_the_draws_are_the_same(tiny_model_dir: Path, dropout: float) -> None:
    """No dropout, or a rate above the geometric range (the 16-bit mask, the same draws
    as FastDropout): the fused layer gives peft's loss and gradients up to rounding."""
    import torch

    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    plain = _lora_model(tiny_model_dir, dtype=torch.float32, dropout=dropout, fused="off")
    fused = _lora_model(tiny_model_dir, dtype=torch.float32, dropout=dropout, fused="on")
    assert _routed(plain) == 0 and _routed(fused) == sum(1 for m in fused.modules() if hasattr(m, "lora_A")) > 0
    l0, g0 = _loss_and_grads(plain, ids)
    l1, g1 = _loss_and_grads(fused, ids)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_fused_geometric_dropout_is_the_reference_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """p = 0.1: y = x W^T + b + s/(1-p) * B A (x with the drawn positions zeroed), and
    the gradients of x, A and B are autograd's of that formula."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from tunesmith.plugins.peft import _fused
    from tunesmith.plugins.peft._dropout import drop_positions, use_fast_dropout

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(24, 12)

        def forward(self, x: Any) -> Any:
            return self.lin(x)

    torch.manual_seed(0)
    model = get_peft_model(One(), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, target_modules=["lin"]))
    layer = model.base_model.model.lin
    nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    use_fast_dropout(model)
    assert _fused.use_fused_lora(model) == 1
    drawn: list = []

    def spy(n: int, p: float) -> Any:
        drawn.append(drop_positions(n, p))
        return drawn[-1]

    monkeypatch.setattr(_fused, "drop_positions", spy)
    model.train()
    x = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 12)
    model(x).backward(g)
    assert len(drawn) == 1 and drawn[0].numel() > 0
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    keep = torch.ones(xr.numel())
    keep[drawn[0]] = 0
    xd = xr * keep.view_as(xr)
    ref = xr @ W.t() + b + (2.0 / (1 - 0.1)) * (xd @ A.t()) @ B.t()
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad)


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_drop_positions_are_bernoulli(p: float) -> None:
    import torch

    from tunesmith.plugins.peft._dropout import drop_positions

    n = 400_000
    torch.manual_seed(0)
    pos = drop_positions(n, p)
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 5 * sigma
    for part in mask.view(4, -1):  # the rate holds along the tensor, not only on average
        assert abs(part.float().mean().item() - p) < 5 * 2 * sigma
    lanes = mask.view(-1, 4).float()  # neighbours independent
    assert torch.corrcoef(lanes.T)[~torch.eye(4, dtype=torch.bool)].abs().max() < 0.02
    torch.manual_seed(0)
    assert torch.equal(drop_positions(n, p), pos)  # the global generator drives it (resume replays it)
    assert drop_positions(0, p).numel() == 0 and drop_positions(10, 0.0).numel() == 0


def test_drop_positions_covers_a_shortfall(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the first batch of gaps ends before n (a 6-sigma event), more are drawn."""
    import torch

    from tunesmith.plugins.peft import _dropout

    real_rand = torch.rand
    calls = []

    def short_first(m: int) -> Any:
        calls.append(m)
        u = real_rand(m)
        return u * 0.01 if len(calls) == 1 else u  # tiny uniforms: short gaps, too few to reach n

    monkeypatch.setattr(_dropout.torch, "rand", short_first)
    pos = _dropout.drop_positions(10_000, 0.05)
    assert len(calls) >= 2 and int(pos[-1]) < 10_000 and bool((pos[1:] > pos[:-1]).all())


def test_fallbacks_use_peft(tiny_model_dir: Path) -> None:
    """Evaluation, disabled adapters, mixed-adapter batches and merged weights take
    peft's own forward: the outputs equal an unfused copy's."""
    import torch

    ids = torch.tensor([[1, 5, 9, 13, 2], [3, 4, 5, 6, 7]])
    plain = _lora_model(tiny_model_dir, dtype=torch.float32, dropout=0.1, fused="off").eval()
    fused = _lora_model(tiny_model_dir, dtype=torch.float32, dropout=0.1, fused="on").eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        with fused.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        names = ["default", "__base__"]
        torch.testing.assert_close(fused(input_ids=ids, adapter_names=names).logits,
                                   plain(input_ids=ids, adapter_names=names).logits)
    # training mode with grad on, but merged: peft's path (the base already holds the
    # update; the fused path would add it twice)
    with torch.no_grad():
        ref = fused(input_ids=ids).logits
    fused.merge_adapter()
    fused.train()
    for m in fused.modules():
        if hasattr(m, "lora_dropout"):
            for d in m.lora_dropout.values():
                d.eval()  # no dropout in the comparison
    torch.testing.assert_close(fused(input_ids=ids).logits.detach(), ref, rtol=1e-4, atol=1e-5)


def test_dora_layers_fall_back_to_peft(tiny_model_dir: Path) -> None:
    import torch

    import tunesmith
    from tunesmith.core.models import load_from_dir
    from tunesmith.plugins.peft._fused import _fast_path

    dora = tunesmith.registry().peft_methods.get("dora")
    ids = torch.tensor([[1, 5, 9, 13]])
    losses = {}
    for fused in ("on", "off"):
        torch.manual_seed(0)
        model, _ = load_from_dir(tiny_model_dir, dtype=torch.float32)
        model = dora.apply(model, dora.Options(r=4, dropout=0.1, target_modules="all-linear", fused=fused), None).train()
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert all(_fast_path(m, torch.randn(1, 4, m.in_features), (), {}) is None for m in layers)
        torch.manual_seed(3)
        losses[fused] = float(model(input_ids=ids, labels=ids).loss)
    assert losses["on"] == losses["off"]


def test_lora_plugin_fuses_where_the_base_is_stored_in_16_bits(tiny_model_dir: Path) -> None:
    import torch

    assert _routed(_lora_model(tiny_model_dir, dtype=torch.float32, dropout=0.05, fused="auto")) == 0
    assert _routed(_lora_model(tiny_model_dir, dtype=torch.bfloat16, dropout=0.05, fused="auto")) > 0
    assert _routed(_lora_model(tiny_model_dir, dtype=torch.bfloat16, dropout=0.05, fused="off")) == 0


def test_bf16_fused_training_tracks_fp32(tiny_model_dir: Path) -> None:
    """A bf16-stored base with fused layers: loss and gradients close to the fp32 run
    (bf16 rounding only; the unfused bf16 path is no closer)."""
    import torch

    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    ref_l, ref = _loss_and_grads(_lora_model(tiny_model_dir, dtype=torch.float32, dropout=0.0, fused="off"), ids)
    flat = torch.cat([g.flatten() for g in ref.values()])
    errs = {}
    for fused in ("off", "on"):
        loss, g = _loss_and_grads(_lora_model(tiny_model_dir, dtype=torch.bfloat16, dropout=0.0, fused=fused), ids, bf16=True)
        assert loss == pytest.approx(ref_l, rel=2e-2)
        errs[fused] = float((torch.cat([g[k].flatten() for k in ref]) - flat).norm() / flat.norm())
    assert errs["on"] < 0.1 and errs["on"] < 1.5 * errs["off"] + 1e-3, errs


def test_cpu_attention_in_fp32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the context transformers' sdpa attention gets fp32 inputs even under CPU
    bf16 autocast and returns bf16; the mapping is restored after (nested too)."""
    import torch
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tunesmith.core.precision import cpu_attention_in_fp32

    seen: list = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, *a: Any, **kw: Any) -> Any:
        seen.append(q.dtype)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy)

    class Mod(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 1

    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cpu_attention_in_fp32():
            with cpu_attention_in_fp32():
                out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](Mod(), q, q, q, None)
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
        plain, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](Mod(), q, q, q, None)
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.bfloat16
    exact, _ = before(Mod(), q.float(), q.float(), q.float(), None)
    assert (out.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-2


def test_gradient_checkpointing_redraws_the_same_positions(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpointed blocks re-run the fused forward in backward: torch restores the CPU
    RNG state, so the dropped positions repeat and gradients equal the run without it."""
    import torch

    from tunesmith.plugins.peft import _fused

    calls = []
    real = _fused.drop_positions
    monkeypatch.setattr(_fused, "drop_positions", lambda n, p: (calls.append(n), real(n, p))[1])
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])
    grads, counts = [], []
    for checkpointing in (False, True):
        calls.clear()
        model = _lora_model(tiny_model_dir, dtype=torch.float32, dropout=0.1, fused="on")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        grads.append(_loss_and_grads(model, ids)[1])
        counts.append(len(calls))
    assert counts[0] > 0 and counts[1] == 2 * counts[0]  # checkpointing re-ran the fused layers
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_traceable_positions_are_bernoulli_with_a_spare_slot() -> None:
    """The compile-time sampler: the same geometric law as drop_positions, a fixed
    draw count, and every entry past the end equal to n."""
    import torch

    from tunesmith.plugins.peft._dropout import drop_positions_traceable

    n, p = 400_000, 0.05
    torch.manual_seed(0)
    pos = drop_positions_traceable(n, p)
    assert pos.numel() == (n * int(1.25 * p * 2**20)) // 2**20 + 64  # a fixed count, whatever the draws
    inside = pos[pos < n]
    assert bool((inside[1:] > inside[:-1]).all()) and bool((pos[inside.numel():] == n).all())
    assert inside.numel() < pos.numel()  # the draws reached past the end
    rate = inside.numel() / n
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(0)
    assert torch.equal(drop_positions_traceable(n, p), pos)
    for small in (1, 7, 64):  # tiny inputs too: the margin covers them
        assert int(drop_positions_traceable(small, 0.2).max()) == small


def test_traced_layer_is_the_reference_formula() -> None:
    """_traced_dropped (the layer under torch.compile): y = x W^T + b + s B A xd with xd
    the input zeroed at the traceable positions, and autograd's gradients of that."""
    import torch

    from tunesmith.plugins.peft import _fused
    from tunesmith.plugins.peft._dropout import drop_positions_traceable

    torch.manual_seed(0)
    W, b = torch.randn(12, 24), torch.randn(12)
    A = torch.randn(3, 24, requires_grad=True)
    B = torch.randn(12, 3, requires_grad=True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 12)
    torch.manual_seed(7)
    y = _fused._traced_dropped(x, W, b, A, B, 2.5, 0.2)
    y.backward(g)
    torch.manual_seed(7)
    pos = drop_positions_traceable(x.numel(), 0.2)
    keep = torch.ones(x.numel() + 1)
    keep[pos] = 0
    xr = x.detach().clone().requires_grad_()
    Ar, Br = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = xr @ W.t() + b + 2.5 * ((xr * keep[:-1].view_as(xr)) @ Ar.t()) @ Br.t()
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        torch.testing.assert_close(got, want)


def test_compiled_fused_layer_drops_at_the_rate_without_graph_breaks() -> None:
    """Under torch.compile(fullgraph=True) the fused layer with dropout compiles whole
    (no graph break from the dropped positions) and drops each element with
    probability p: with W = 0 and A, B the identity, y = s x with the dropped elements zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from tunesmith.plugins.peft import _fused
    from tunesmith.plugins.peft._dropout import use_fast_dropout

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(32, 32, bias=False)

        def forward(self, x: Any) -> Any:
            return self.lin(x)

    torch._dynamo.reset()
    p = 0.1
    model = get_peft_model(One(), LoraConfig(r=32, lora_alpha=32, lora_dropout=p, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(32))
        layer.lora_B["default"].weight.copy_(torch.eye(32))
    use_fast_dropout(model)
    assert _fused.use_fused_lora(model) == 1
    model.train()
    step = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.rand(2000, 32) + 1.0  # never zero itself
    torch.manual_seed(3)
    y = step(x.requires_grad_())
    zero = y.detach() == 0
    n = zero.numel()
    assert abs(zero.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(y.detach()[~zero], (x.detach() / (1 - p))[~zero])
    y.sum().backward()  # the dropped elements get no gradient through the adapter (W = 0)
    torch.testing.assert_close(x.grad[zero], torch.zeros(int(zero.sum())))
    torch.testing.assert_close(x.grad[~zero], torch.full((n - int(zero.sum()),), 1 / (1 - p)))
    torch.manual_seed(3)
    assert torch.equal(step(x.detach()) == 0, zero)  # seeded: the same draws
    torch._dynamo.reset()
