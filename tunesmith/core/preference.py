"""Preference pairs as training batches: tokenising chosen/rejected pairs, the pairs
collator, and :func:`train_on_pairs`, what the pair objectives (``dpo``,
``reward``, ...) run inside the training session.

* :func:`tokenize_pair` - one canonical pairs record (``{"prompt", "chosen",
  "rejected"}``) into chosen and rejected token ids with completion masks;
* :class:`PairCollator` - pads a list of tokenised pairs into one batch of ``2B``
  rows, the B chosen first (``input_ids``, ``attention_mask``, ``completion_mask``,
  ``labels`` with -100 outside the completion, and ``margin`` when pairs carry one);
* :func:`train_on_pairs` - tokenise, batch, train with the session's losses, save.
"""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.core.errors import DataError

log = logging.getLogger("tunesmith.preference")

from tunesmith.core.labelled import IGNORE_INDEX


# --------------------------------------------------------------------------- tokenising
def _completion(tokenizer: Any, prompt: list[dict], reply: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) of prompt + reply; the mask covers the reply's assistant turns."""
    from tunesmith.core.render import render_chat, render_prompt

    full = render_chat(tokenizer, list(prompt) + list(reply), max_length=None, completion_only=True)
    ids = full["input_ids"]
    labels = full["labels"]
    n_prompt = 0
    if prompt:
        ptext = render_prompt(tokenizer, prompt)
        n_prompt = len(tokenizer(ptext, add_special_tokens=False)["input_ids"])
    mask = [1 if (l != IGNORE_INDEX and i >= n_prompt) else 0 for i, l in enumerate(labels)]
    if len(ids) > max_length:
        # keep the completion: drop prompt tokens from the left first, then cut the end
        start = next((i for i, m in enumerate(mask) if m), len(ids))
        drop = min(len(ids) - max_length, start)
        ids, mask = ids[drop:], mask[drop:]
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def tokenize_pair(tokenizer: Any, record: dict, *, max_length: int) -> dict:
    """Token ids and completion masks of a pairs record's chosen and rejected replies.

    Raises DataError (naming the record's source line) when a reply has no
    completion token left.
    """
    prompt = list(record.get("prompt") or [])
    c_ids, c_mask = _completion(tokenizer, prompt, record["chosen"], max_length)
    r_ids, r_mask = _completion(tokenizer, prompt, record["rejected"], max_length)
    if not any(c_mask) or not any(r_mask):
        meta = record.get("metadata") or {}
        raise DataError(
            "a chosen or rejected reply has no tokens left to score (empty, or the prompt fills max_length)",
            path=meta.get("source"),
            line=meta.get("line") or meta.get("row"),
        )
    out = {
        "chosen_input_ids": c_ids,
        "chosen_completion_mask": c_mask,
        "rejected_input_ids": r_ids,
        "rejected_completion_mask": r_mask,
    }
    margin = (record.get("metadata") or {}).get("margin", record.get("margin"))
    if isinstance(margin, (int, float)):
        out["margin"] = float(margin)
    return out


def tokenize_pairs(tokenizer: Any, records: list[dict], *, max_length: int, skip_invalid: bool = True) -> list[dict]:
    """:func:`tokenize_pair` over records; unusable pairs are skipped (with a warning) or raise."""
    out = []
    skipped = 0
    for rec in records:
        if "chosen" not in rec or "rejected" not in rec:
            meta = rec.get("metadata") or {}
            raise DataError(
                "preference training needs chosen/rejected pairs, this record is "
                + ("chat" if "messages" in rec else "text"),
                path=meta.get("source"),
                line=meta.get("line") or meta.get("row"),
            )
        try:
            out.append(tokenize_pair(tokenizer, rec, max_length=max_length))
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        log.warning("skipped %d preference pair(s) with no completion tokens within max_length", skipped)
    if not out:
        raise DataError("no usable preference pairs")
    return out


class PairCollator:
    """Pad tokenised pairs into one ``(2B, T)`` batch: chosen rows, then rejected rows."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        rows = [(f["chosen_input_ids"], f["chosen_completion_mask"]) for f in features]
        rows += [(f["rejected_input_ids"], f["rejected_completion_mask"]) for f in features]
        T = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        comp = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r_ids, r_mask) in enumerate(rows):
            n = len(r_ids)
            ids[i, :n] = torch.tensor(r_ids, dtype=torch.long)
            attn[i, :n] = 1
            comp[i, :n] = torch.tensor(r_mask, dtype=torch.long)
        batch = {
            "input_ids": ids,
            "attention_mask": attn,
            "completion_mask": comp,
            "labels": ids.masked_fill(comp == 0, IGNORE_INDEX),
        }
        if all("margin" in f for f in features):
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------- training
def final_logs(history: list[dict], prefix: str) -> dict:
    """The last logged value of each ``<prefix>/...`` key."""
    out: dict[str, float] = {}
    for row in history:
        for k, v in row.items():
            if k.startswith(prefix + "/") and isinstance(v, (int, float)):
                out[k[len(prefix) + 1 :]] = float(v)
    return out


def train_on_pairs(session: Any, *, head: str = "causal_lm") -> dict:
    """Train a pair objective inside ``session`` with the session's losses (the main
    one reads ``pairs``; regularisers such as ``ewc`` may join); ``head`` is
    ``sequence_classification`` for a reward model. Returns the result fields,
    ``final/<loss>/...`` holding the main loss's last logged values."""
    from tunesmith.core.registry import member
    from tunesmith.core.training import ListDataset, eval_summary

    cfg = session.cfg
    main_loss = next(name for name, plugin, _, _ in session.losses if member(plugin, "losses", "requires") == "pairs")
    model, tok = session.prepare_model(head=head)
    train_recs, eval_recs, source = session.records()
    max_length = cfg.training.max_length
    train_ds = ListDataset(tokenize_pairs(tok, train_recs, max_length=max_length))
    eval_ds = ListDataset(tokenize_pairs(tok, eval_recs, max_length=max_length)) if eval_recs else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lr = session.learning_rate(len(train_recs))
    args = session.training_arguments(
        has_eval=eval_ds is not None, learning_rate=lr, prediction_loss_only=True, label_names=["labels"],
    )
    trainer, out, runtime = session.run_trainer(args=args, train_ds=train_ds, eval_ds=eval_ds, collator=PairCollator(pad))
    fields: dict[str, Any] = {
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "runtime_s": round(runtime, 2),
        "tokens": int(trainer.tokens_seen),
        "learning_rate": float(lr),
        "pairs": len(train_ds),
        "data": source,
    }
    fields.update({f"final/{k}": v for k, v in final_logs(trainer.state.log_history, main_loss).items()})
    fields.update(eval_summary(trainer.state.log_history))
    session.save_final(
        trainer.accelerator.unwrap_model(trainer.model), fields, head=head,
        losses=[{"name": n, "weight": w} for n, _, _, w in session.losses],
    )
    return fields
