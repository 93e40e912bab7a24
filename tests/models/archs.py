"""Tiny models of each architecture, built from configs.

They use a small byte-level BPE tokenizer trained here (512 tokens, ChatML
specials, GPT-2 pre-tokenizer): reading a GGUF file's metadata costs seconds
per 50k-token vocabulary, and the matrix reads many files. The real SmolLM2
tokenizer's GGUF fidelity is tested in tests/export/test_default_model.py.

Sizes keep the matrix fast (hidden 64, 2 layers) while every architecture keeps
what makes it different (biases, q/k norms, fused projections, soft-capping,
sliding windows, sandwich norms). Gemma keeps its default head_dim 256 (and
query_pre_attn_scalar 256), because llama.cpp scales Gemma attention by
1/sqrt(head_dim) and transformers' GGUF reader restores the default scalar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)

#: name -> (config class name in transformers, model class name, extra config)
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 128}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
}


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS = [
    "What is {a} plus {b}? {c}.".format(a=a, b=b, c=a + b) for a in range(1, 30) for b in range(1, 10)
] + [
    "The capital of France is Paris. Route the ticket to the billing team with high priority.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: user assistant system model",
]


def small_tokenizer(out: Path | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (ChatML specials first, GPT-2 pre-tokenizer), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    if out is not None:
        tok.save_pretrained(out)
    return tok


def build(arch: str, out: Path, *, tok_dir: Path | None = None, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny ``arch`` model with a tokenizer (``tok_dir``'s, else :func:`small_tokenizer`) in ``out``."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    cfg_cls, model_cls, extra = ARCHS[arch]
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir else small_tokenizer()
    if not chat_template:
        tok.chat_template = None
    kwargs = {**COMMON, **extra}
    # no padding_idx: a pretrained model's pad row is not zero (a zero row reads as an untrained token)
    kwargs["pad_token_id"] = None
    config = getattr(transformers, cfg_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random norms, so a wrong norm layout shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
