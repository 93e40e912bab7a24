"""Direct Preference Optimisation and its variants, as one loss plugin.

The batch is the pairs collator's (``tunesmith.core.preference``): ``input_ids``,
``attention_mask`` and ``completion_mask`` of shape ``(2B, T)``, the B chosen
sequences first and then the B rejected ones (row ``i`` and row ``B + i`` share a
prompt). Optional ``ref_chosen_logps`` / ``ref_rejected_logps`` carry reference
log-probabilities computed beforehand.

Variants (``loss_type``), with ``d = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))``:

* ``sigmoid``  ``-log sigmoid(beta d)``; with ``label_smoothing = e`` it is
  conservative DPO, ``-(1-e) log sigmoid(beta d) - e log sigmoid(-beta d)``;
* ``robust``   robust DPO (rDPO), the unbiased estimator under label noise ``e``;
* ``hinge``    ``relu(1 - beta d)`` (SLiC);
* ``ipo``      ``(d' - 1/(2 beta))^2`` where ``d'`` uses per-token averaged log-ratios
  (IPO as TRL implements it, normalised by completion length);
* ``simpo``    reference-free: ``-log sigmoid(beta (avg log pi(c) - avg log pi(r)) - gamma)``.

The reference log-probabilities come from the same model with its adapter
disabled when the model is a PEFT model (no second copy in memory), otherwise
from a frozen copy made at ``setup`` (the start of training).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith import hookimpl

LossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo"]
REF_STATE_KEY = "dpo.ref_model"


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (SimPO: reward scale).")
    loss_type: LossType = Field("sigmoid", description="sigmoid (DPO), robust (rDPO), hinge, ipo or simpo.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed probability that a pair's labels are flipped (conservative/robust DPO)."
    )
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin gamma (loss_type: simpo).")
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "none"] = Field(
        "auto",
        description="Where reference log-probs come from: auto = the adapter disabled for PEFT models, "
        "else a frozen copy made at the start of training; none only for simpo.",
    )

    @model_validator(mode="after")
    def _check(self) -> "DPOOptions":
        if self.reference == "none" and self.loss_type != "simpo":
            raise ValueError(f"reference: none needs loss_type: simpo (got {self.loss_type})")
        return self


# --------------------------------------------------------------------------- the math
def dpo_loss(
    chosen_logps: Any,
    rejected_logps: Any,
    ref_chosen_logps: Any = None,
    ref_rejected_logps: Any = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Any = None,
    rejected_lengths: Any = None,
    simpo_gamma: float = 0.5,
) -> tuple[Any, Any, Any]:
    """Per-pair losses and the implicit rewards of chosen and rejected.

    ``*_logps`` are summed log-probabilities of each completion, shape ``(B,)``;
    ``*_lengths`` the completion token counts (needed by ``ipo`` and ``simpo``).
    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the
    rewards are detached.
    """
    import torch
    import torch.nn.functional as F

    eps = label_smoothing
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs the completion lengths")
        c = chosen_logps / chosen_lengths.clamp(min=1)
        r = rejected_logps / rejected_lengths.clamp(min=1)
        logits = beta * (c - r) - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, (beta * c).detach(), (beta * r).detach()

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type} needs reference log-probabilities")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs the completion lengths")
        d = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type '{loss_type}'")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def reward_logs(losses: Any, chosen_rewards: Any, rejected_rewards: Any) -> dict[str, float]:
    """The values a DPO step logs (TRL's names)."""
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": float(chosen_rewards.float().mean()),
        "rewards/rejected": float(rejected_rewards.float().mean()),
        "rewards/margins": float(margins.float().mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
    }


def sequence_logps(model: Any, input_ids: Any, attention_mask: Any, completion_mask: Any) -> tuple[Any, Any]:
    """Summed log-probabilities of the completion tokens, and their counts, per row.

    Position ``t`` predicts token ``t + 1``; prompt-learning PEFT methods prepend
    virtual tokens to the logits, so only the last ``T`` positions are used.
    """
    import torch

    T = input_ids.shape[1]
    # the vocabulary projection dominates on small models: only compute the logits
    # from the earliest completion token on (prompts are often most of a row)
    cols = completion_mask.any(0).nonzero()
    first = int(cols[0]) if len(cols) else 1
    keep = T - max(first, 1) + 1
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits
    if logits.shape[1] < keep:  # pragma: no cover - defensive
        raise ValueError("the model returned fewer logits than asked for")
    logits = logits[:, -keep:][:, :-1].float()
    targets = input_ids[:, T - keep + 1 :]
    mask = completion_mask[:, T - keep + 1 :].to(logits.dtype)
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _unwrap(model: Any) -> Any:
    inner = getattr(model, "module", None)
    return inner if inner is not None and type(model).__name__ in {"DistributedDataParallel", "DataParallel"} else model


def make_reference(model: Any, options: DPOOptions) -> Any:
    """A frozen copy of ``model`` (full fine-tuning), or None when the adapter can be disabled."""
    import copy

    mode = options.reference
    if options.loss_type == "simpo" or mode == "none":
        return None
    peft = is_peft_model(_unwrap(model))
    if mode == "adapter_disabled" or (mode == "auto" and peft):
        if not peft:
            from tunesmith.core.errors import ConfigError

            raise ConfigError("reference: adapter_disabled needs a PEFT method (peft.method is full)", key="losses")
        return None
    ref = copy.deepcopy(_unwrap(model))
    ref.eval()
    ref.requires_grad_(False)
    return ref


def reference_logps(model: Any, ref_model: Any, batch: dict) -> tuple[Any, Any]:
    """Summed completion log-probs under the reference (adapter disabled, or the frozen copy)."""
    import torch

    # gradient checkpointing (non-reentrant) is harmless under no_grad: it just runs the forward
    with torch.no_grad():
        if ref_model is None:
            m = _unwrap(model)
            with m.disable_adapter():
                logps, _ = sequence_logps(m, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        else:
            logps, _ = sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return logps.detach()


class DPO:
    name = "dpo"
    description = "Direct Preference Optimisation (sigmoid, conservative, robust, IPO, hinge, SimPO) on chosen/rejected pairs."
    requires = "pairs"
    Options = DPOOptions

    def setup(self, model: Any, options: DPOOptions, context: Any) -> None:
        state = context.state if context is not None else {}
        if REF_STATE_KEY not in state:
            state[REF_STATE_KEY] = make_reference(model, options)

    def compute(self, model: Any, batch: dict, options: DPOOptions, context: Any) -> tuple[Any, dict]:
        state = context.state if context is not None else {}
        if REF_STATE_KEY not in state:
            self.setup(model, options, context)
        ref_model = state.get(REF_STATE_KEY)
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n], logps[n:]
        ref_c = ref_r = None
        if options.loss_type != "simpo":
            if batch.get("ref_chosen_logps") is not None:
                ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                if ref_model is not None and next(ref_model.parameters()).device != batch["input_ids"].device:
                    ref_model.to(batch["input_ids"].device)
                ref = reference_logps(model, ref_model, batch)
                ref_c, ref_r = ref[:n], ref[n:]
        losses, cr, rr = dpo_loss(
            chosen,
            rejected,
            ref_c,
            ref_r,
            beta=options.beta,
            loss_type=options.loss_type,
            label_smoothing=options.label_smoothing,
            chosen_lengths=lengths[:n],
            rejected_lengths=lengths[n:],
            simpo_gamma=options.simpo_gamma,
        )
        logs = reward_logs(losses, cr, rr)
        logs["logps/chosen"] = float(chosen.detach().mean())
        logs["logps/rejected"] = float(rejected.detach().mean())
        return losses.mean(), logs


@hookimpl
def register_losses(register: Any) -> None:
    register(DPO())
