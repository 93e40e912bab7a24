"""Turning canonical records into token ids and labels.

* :func:`render_chat` - a conversation through the tokenizer's chat template, with
  completion-only labels (``-100`` on everything but the assistant turns) done here,
  because TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers most
  templates lack. The end-of-turn token (``<|im_end|>`` and friends) of every
  assistant turn is trained, so the tuned model learns to stop.
* :func:`render_text` - raw text (continued pre-training) with EOS appended.
* :func:`chunk_tokens` - concatenate token lists and cut fixed-size blocks (CPT).
* :func:`pack_examples` - first-fit bin packing of examples into rows of at most
  ``max_length`` tokens, each example keeping its own position ids.
* :class:`TokenCollator` - pads (right) with the pad id and ``-100`` labels, or
  flattens a batch into one padding-free row with per-example position ids (the
  attention stays within each example: transformers builds a block-diagonal mask
  from the restarted position ids).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

IGNORE_INDEX = -100


def _template(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _clean(messages: Sequence[dict]) -> list[dict]:
    """role and content (and a user turn's ``input``, which the alpaca template renders
    as its ``### Input:`` block); other keys never reach the template."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("input"):
            msg["input"] = m["input"]
        out.append(msg)
    return out


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    max_length: int | None = None,
    completion_only: bool = True,
    train_on_eos: bool = True,
    train_last_turn_only: bool = False,
) -> dict:
    """Tokenise a conversation; labels cover the assistant turns (or everything).

    Returns ``{"input_ids", "labels", "attention_mask", "truncated", "n_labels"}``
    as plain lists. Truncation keeps the left part (``truncated`` says it happened).
    """
    from tunesmith.core.models import end_of_turn_token

    msgs = _clean(messages)
    full = _template(tokenizer, msgs)
    eot = end_of_turn_token(tokenizer)
    # character spans of assistant content (+ end-of-turn token)
    spans: list[tuple[int, int]] = []
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_last_turn_only and assistant_idx:
        assistant_idx = assistant_idx[-1:]
    fallback = False
    for i in assistant_idx:
        before = _template(tokenizer, msgs[:i], add_generation_prompt=True) if i > 0 else ""
        upto = _template(tokenizer, msgs[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            fallback = True
            break
        start, end = len(before), len(upto)
        content = msgs[i]["content"]
        # the generation prompt may differ in whitespace: anchor at the content
        pos = upto.find(content, start) if content else start
        if pos >= 0:
            start = pos
        seg = upto[start:end]
        if eot and eot in seg[len(content):]:
            end = start + len(content) + seg[len(content):].index(eot) + (len(eot) if train_on_eos else 0)
        elif not train_on_eos:
            end = start + len(content)
        spans.append((start, end))
    if fallback:  # a template whose prefixes are not prefixes: label each assistant content
        spans = []
        cursor = 0
        for i in assistant_idx:
            content = msgs[i]["content"]
            pos = full.find(content, cursor)
            if pos < 0:
                continue
            end = pos + len(content)
            if train_on_eos and eot and full.startswith(eot, end):
                end += len(eot)
            spans.append((pos, end))
            cursor = end

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    if completion_only:
        labels = [IGNORE_INDEX] * len(ids)
        si = 0
        for t, (a, b) in enumerate(offsets):
            while si < len(spans) and spans[si][1] <= a:
                si += 1
            if si < len(spans) and b > spans[si][0] and a < spans[si][1]:
                labels[t] = ids[t]
    else:
        labels = list(ids)
    # templates that end a turn without an EOS: append one so the model learns to stop
    if train_on_eos and eot is None and tokenizer.eos_token_id is not None and msgs and msgs[-1]["role"] == "assistant":
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": [1] * len(ids),
        "truncated": truncated,
        "n_labels": sum(1 for x in labels if x != IGNORE_INDEX),
    }


def render_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The text a model continues for generation: the conversation plus the assistant prompt."""
    return _template(tokenizer, _clean(messages), add_generation_prompt=True)


def render_text(tokenizer: Any, text: str, *, max_length: int | None = None, add_eos: bool = True) -> dict:
    """Tokenise raw text for continued pre-training; every token is a label."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, truncated = ids[:max_length], True
    return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids), "truncated": truncated, "n_labels": len(ids)}


def chunk_tokens(sequences: Iterable[Sequence[int]], block_size: int, *, drop_last: bool = False) -> list[dict]:
    """Concatenate token lists and cut ``block_size`` blocks (the CPT recipe)."""
    buf: list[int] = []
    out: list[dict] = []
    for seq in sequences:
        buf.extend(seq)
        while len(buf) >= block_size:
            block, buf = buf[:block_size], buf[block_size:]
            out.append({"input_ids": block, "labels": list(block), "attention_mask": [1] * block_size})
    if buf and not drop_last:
        out.append({"input_ids": buf, "labels": list(buf), "attention_mask": [1] * len(buf)})
    return out


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing of examples into rows of <= max_length tokens.

    Each row keeps ``position_ids`` restarting at 0 for every example, so attention
    never crosses examples (block-diagonal mask) and the first label of each example
    is masked (no prediction across the boundary).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(len(examples[i]["input_ids"]), max_length)
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    rows = []
    for b in bins:
        rows.append(_flatten([examples[i] for i in b], max_length))
    return rows


def _flatten(examples: Sequence[dict], max_length: int | None = None) -> dict:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        e_ids = list(ex["input_ids"])[:max_length] if max_length else list(ex["input_ids"])
        e_lab = list(ex["labels"])[: len(e_ids)]
        if e_lab:
            e_lab[0] = IGNORE_INDEX
        ids.extend(e_ids)
        labels.extend(e_lab)
        pos.extend(range(len(e_ids)))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class TokenCollator:
    """Collate tokenised examples into tensors.

    ``padding_free=False``: right-pad ``input_ids`` with ``pad_token_id``, ``labels``
    with -100, ``attention_mask`` with 0 (rows that carry ``position_ids`` - packed
    rows - get them padded too and no attention mask).
    ``padding_free=True``: one row of all examples with restarting ``position_ids``
    and no attention mask, so there is no padding at all.
    """

    def __init__(self, pad_token_id: int, *, padding_free: bool = False, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if self.padding_free:
            flat = _flatten(features)
            return {
                "input_ids": torch.tensor([flat["input_ids"]], dtype=torch.long),
                "labels": torch.tensor([flat["labels"]], dtype=torch.long),
                "position_ids": torch.tensor([flat["position_ids"]], dtype=torch.long),
            }
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        has_pos = "position_ids" in features[0]
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        pos = torch.zeros((len(features), n), dtype=torch.long)
        for r, f in enumerate(features):
            k = len(f["input_ids"])
            ids[r, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[r, :k] = torch.tensor(f["labels"], dtype=torch.long)
            mask[r, :k] = 1
            if has_pos:
                pos[r, :k] = torch.tensor(f["position_ids"], dtype=torch.long)
                if k < n:  # padding continues as its own "sequence"
                    pos[r, k:] = torch.arange(n - k)
        batch = {"input_ids": ids, "labels": labels}
        if has_pos:  # packed rows: padding is its own block (labels -100), no mask needed
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        return batch
