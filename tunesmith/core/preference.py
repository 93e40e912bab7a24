"""Preference training: tokenising chosen/rejected pairs, the pairs collator, and the
``dpo`` and ``reward`` objectives.

Public pieces:

* :func:`tokenize_pair` - one canonical pairs record (``{"prompt", "chosen",
  "rejected"}``) into chosen and rejected token ids with completion masks;
* :class:`PairCollator` - pads a list of tokenised pairs into one batch of ``2B``
  rows, the B chosen first (``input_ids``, ``attention_mask``, ``completion_mask``,
  ``labels`` with -100 outside the completion, and ``margin`` when pairs carry one);
* :func:`check_loss_requirements` - the config's losses against the batch kind of
  the objective (``tokens`` or ``pairs``): a ConfigError before anything loads;
* :func:`train_dpo` / :func:`train_reward` - what ``tunesmith.core.training.train``
  dispatches to for ``objective: dpo`` and ``objective: reward``.
"""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.core.errors import ConfigError, DataError

log = logging.getLogger("tunesmith.preference")

IGNORE_INDEX = -100
#: the batch kind each objective produces
OBJECTIVE_BATCH = {"sft": "tokens", "cpt": "tokens", "dpo": "pairs", "reward": "pairs"}
#: losses used when the config lists none
DEFAULT_LOSSES = {"dpo": "dpo", "reward": "reward_model"}


# --------------------------------------------------------------------------- config checks
def check_loss_requirements(cfg: Any, registries: Any, batch_kind: str | None = None) -> list[tuple[Any, Any, float, Any]]:
    """``[(spec, loss plugin, weight, options)]`` for the config, after checking that every
    loss can read the batches of the objective.

    A loss whose ``requires`` is ``"tokens"`` under a pairs objective (or the other
    way round) is a ConfigError naming the loss and the objective; so is a pairs
    objective without any pairs loss. With no ``losses:`` the objective's default
    loss is used (``dpo`` for dpo, ``reward_model`` for reward, ``causal_lm`` else).
    """
    objective = getattr(cfg, "objective", "sft")
    kind = batch_kind or OBJECTIVE_BATCH.get(objective, "tokens")
    specs = list(cfg.losses or [])
    out = []
    if not specs:
        name = DEFAULT_LOSSES.get(objective, "causal_lm")
        loss = registries.losses.get(name)
        opts_model = getattr(loss, "Options", None)
        out.append((None, loss, 1.0, opts_model() if opts_model is not None else None))
    for i, spec in enumerate(specs):
        loss = registries.losses.get(spec.plugin_name)
        needs = getattr(loss, "requires", None)
        if needs is not None and needs != kind:
            what = "chosen/rejected pairs" if needs == "pairs" else "token sequences"
            have = "chosen/rejected pairs" if kind == "pairs" else "token sequences"
            raise ConfigError(
                f"the loss '{spec.plugin_name}' needs {what}, but objective '{objective}' gives {have}"
                + (" (use objective: dpo or reward with preference-pair data)" if needs == "pairs" else
                   " (with objective: dpo list dpo, with reward list reward_model)"),
                key=f"losses.{i}.name",
                source=getattr(cfg, "source", None),
            )
        opts = spec._options
        if opts is None and getattr(loss, "Options", None) is not None:
            opts = loss.Options.model_validate(spec.plugin_fields())
        out.append((spec, loss, float(spec.weight), opts))
    if kind == "pairs" and not any(getattr(l, "requires", None) == "pairs" for _, l, _, _ in out):
        raise ConfigError(
            f"objective '{objective}' needs a loss that reads chosen/rejected pairs "
            f"(add {{name: {DEFAULT_LOSSES.get(objective, 'dpo')}}} to losses)",
            key="losses",
            source=getattr(cfg, "source", None),
        )
    return out


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
