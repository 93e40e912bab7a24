"""DPO with LoRA, QLoRA and full fine-tuning trains: reward accuracy on the training pairs rises above 0.5.

These drive the ``dpo`` loss plugin directly with a plain optimiser (the trainer
path is tested in test_preference.py), on the tiny model with the real tokenizer.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tunesmith.core.context import RunContext  # noqa: E402
from tunesmith.core.preference import PairCollator, tokenize_pairs  # noqa: E402
from tunesmith.plugins.losses.dpo import DPO, REF_STATE_KEY, DPOOptions  # noqa: E402

PAIRS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {a} plus {b}?"}],
        "chosen": [{"role": "assistant", "content": f"{a + b}."}],
        "rejected": [{"role": "assistant", "content": f"I think it is {a * b + 7}, maybe."}],
    }
    for a in range(1, 4)
    for b in range(1, 3)
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared by many processes: one thread is faster and steadier here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(tiny_model_dir, method: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tunesmith.core.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    torch.manual_seed(0)
    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, PAIRS, max_length=128))
    return model, tok, batch


def _train(model, batch, options, steps: int, lr: float):
    loss_fn = DPO()
    ctx = RunContext()
    loss_fn.setup(model, options, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    first = None
    for _ in range(steps):
        loss, logs = loss_fn.compute(model, batch, options, ctx)
        first = first or logs
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, final = loss_fn.compute(model, batch, options, ctx)
    return first, final, ctx


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_with_adapters_raises_reward_accuracy(tiny_model_dir, method: str) -> None:
    model, tok, batch = _setup(tiny_model_dir, method)
    first, final, ctx = _train(model, batch, DPOOptions(beta=0.1), steps=12, lr=5e-3)
    # no second copy: the reference is the same model with the adapter disabled
    assert ctx.state[REF_STATE_KEY] is None
    # a fresh adapter starts as the base model: zero rewards, no accuracy
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/accuracies"] == 0.0
    assert final["rewards/accuracies"] > 0.5
    assert final["rewards/margins"] > 0.0


def test_dpo_full_finetuning_uses_a_frozen_copy(tiny_model_dir) -> None:
    model, tok, batch = _setup(tiny_model_dir, "full")
    first, final, ctx = _train(model, batch, DPOOptions(beta=0.1, loss_type="ipo"), steps=6, lr=1e-3)
    ref = ctx.state[REF_STATE_KEY]
    assert ref is not None and ref is not model
    assert all(not p.requires_grad for p in ref.parameters())
    # the reference stayed at the starting weights while the policy moved
    moved = any(not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert moved
    assert final["rewards/accuracies"] > 0.5


def test_simpo_needs_no_reference(tiny_model_dir) -> None:
    model, tok, batch = _setup(tiny_model_dir, "lora")
    first, final, ctx = _train(model, batch, DPOOptions(beta=2.0, loss_type="simpo", simpo_gamma=0.5), steps=8, lr=5e-3)
    assert ctx.state[REF_STATE_KEY] is None
    assert final["rewards/margins"] > first["rewards/margins"]
