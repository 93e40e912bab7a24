"""``objective: orpo`` - odds-ratio preference optimisation (Hong et al. 2024).

One loss on chosen/rejected pairs, no reference model::

    L = NLL(chosen) - beta * mean(log sigmoid(log odds(c) - log odds(r)))
    log odds(y) = log p(y) - log(1 - p(y)),  p(y) = exp(mean token log-prob of y)

``beta`` is the paper's lambda (TRL's ``beta``, default 0.1). The NLL is the SFT
term on the chosen reply: over its completion tokens (``sft_on: completion``,
tunesmith's completion-only convention) or over prompt and completion
(``sft_on: all``, what TRL's ``ORPOTrainer`` does). With ``sft_on: all`` the loss
and its logged values equal TRL's ``ORPOTrainer.get_batch_loss_metrics`` on the
same batch within 1e-5 (tests/objectives/test_orpo.py).

Why not TRL's trainer: ORPO lives in ``trl.experimental`` and tokenises with its
own path; as a loss plugin on tunesmith's pairs batches (core/preference.py) it
runs in tunesmith's Trainer (atomic checkpoints, resume, callbacks) and composes
with regularisers such as ``ewc``. This module registers the objective and its loss.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class ORPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (the paper's lambda, TRL's beta).")
    sft_on: Literal["completion", "all"] = Field(
        "completion", description="SFT term over the chosen completion only, or over prompt + completion (TRL).")


def log1mexp(x: Any) -> Any:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg_logps: Any, rejected_avg_logps: Any, *, beta: float = 0.1) -> tuple[Any, Any, Any, Any]:
    """``(log sigmoid(log odds ratio) per pair, chosen rewards, rejected rewards, log odds ratio)``;
    the ORPO loss subtracts ``beta`` times the first term's mean from the NLL."""
    import torch.nn.functional as F

    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return F.logsigmoid(log_odds), (beta * c).detach(), (beta * r).detach(), log_odds


def _token_logps(model: Any, input_ids: Any, attention_mask: Any, first: int) -> tuple[Any, int]:
    """Per-token log-probs of tokens ``start..T-1`` (``start = max(first, 1)``) and ``start``."""
    import torch

    T = input_ids.shape[1]
    start = max(first, 1)
    keep = T - start + 1
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, -keep:][:, :-1].float()
    targets = input_ids[:, start:]
    tl = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return tl, start


class ORPOLoss:
    name = "orpo"
    description = "ORPO: SFT on the chosen reply plus an odds-ratio preference term; no reference model."
    requires = "pairs"
    Options = ORPOOptions

    def compute(self, model: Any, batch: dict, options: ORPOOptions, context: Any) -> tuple[Any, dict]:
        ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        n = ids.shape[0] // 2
        if options.sft_on == "all":
            first = 1
        else:
            cols = comp.any(0).nonzero()
            first = int(cols[0]) if len(cols) else 1
        tl, start = _token_logps(model, ids, attn, first)
        m = comp[:, start:].to(tl.dtype)
        avg = (tl * m).sum(-1) / m.sum(-1).clamp(min=1)
        sft_mask = m[:n] if options.sft_on == "completion" else attn[:n, start:].to(tl.dtype)
        nll = -(tl[:n] * sft_mask).sum() / sft_mask.sum().clamp(min=1)
        ratio, cr, rr, log_odds = odds_ratio_loss(avg[:n], avg[n:], beta=options.beta)
        loss = nll - options.beta * ratio.mean()
        logs = {
            "rewards/chosen": float(cr.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((cr > rr).float().mean()),
            "rewards/margins": float((cr - rr).mean()),
            "logps/chosen": float(avg[:n].detach().mean()),
            "logps/rejected": float(avg[n:].detach().mean()),
            "nll_loss": float(nll.detach()),
            "log_odds_ratio": float(ratio.detach().mean()),
            "log_odds_chosen": float(log_odds.detach().mean()),
        }
        return loss, logs


class ORPO:
    name = "orpo"
    description = "Odds-ratio preference optimisation: SFT + odds-ratio term on chosen/rejected pairs, no reference model"
    batch_kind = "pairs"
    default_losses = ("orpo",)
    learning_rate_scale = 0.1

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.preference import train_on_pairs

        return train_on_pairs(session)


@hookimpl
def register_objectives(register: Any) -> None:
    register(ORPO())


@hookimpl
def register_losses(register: Any) -> None:
    register(ORPOLoss())
