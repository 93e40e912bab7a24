"""``objective: kto`` - Kahneman-Tversky optimisation on unpaired feedback.

Each row is one completion with a thumbs-up or thumbs-down (``label``; data format
``kto``, see :mod:`tunesmith.plugins.data.kto`); preference pairs work too and are
unpaired first (chosen -> desirable, rejected -> undesirable). With
``r = log pi(y|x) - log ref(y|x)`` and ``z0`` the KL estimate::

    desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
    undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))

``z0 = max(0, mean(log pi(y'|x) - log ref(y'|x)))`` over mismatched pairs of the
batch (each prompt with the previous row's completion, as TRL builds them), under
no gradient. ``loss_type: apo_zero_unpaired`` drops ``z0`` (APO-zero, unpaired).
The reference is the same model with the adapter disabled (a frozen copy for full
fine-tuning), as for DPO.

Why the loss is tunesmith's own and not TRL's ``KTOTrainer``: that trainer bakes
the mismatched KL pairs into the data set at tokenisation time, so it needs a
sequential sampler, tokenises with its own path instead of tunesmith's chat
rendering (completion masks, the run's chat template) and checkpoints its own
way. Here the KL pairs are made per batch by the collator, so the data can be
shuffled, and the run is tunesmith's Trainer: atomic checkpoints, resume, the
standard callbacks, and the ``kto`` loss composes with regularisers such as
``ewc`` under ``losses:``. The numbers are TRL's: loss, rewards and KL match
``KTOTrainer._compute_loss`` on the same batch within 1e-5
(tests/objectives/test_kto.py).

This module registers both the objective and its loss (``losses: [{name: kto,
beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0}]``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

log = logging.getLogger("tunesmith.kto")

REF_STATE_KEY = "kto.ref_model"
IGNORE_INDEX = -100


class KTOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (TRL's beta).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (with the KL reference point z0) or apo_zero_unpaired (no z0).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable (label true) rows' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable (label false) rows' losses.")
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = Field(
        "auto", description="Reference log-probs: auto = the adapter disabled for PEFT models, else a frozen copy.")


# --------------------------------------------------------------------------- the math
def kto_loss(
    policy_logps: Any,
    ref_logps: Any,
    labels: Any,
    kl_policy_logps: Any = None,
    kl_ref_logps: Any = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Any, Any, Any, Any]:
    """``(losses, chosen_rewards, rejected_rewards, kl)``.

    ``*_logps`` are summed completion log-probs per row ``(B,)``; ``labels`` is a bool
    ``(B,)`` (True: desirable). ``losses`` holds the weighted desirable losses, then
    the undesirable ones (TRL's order; the batch loss is their mean). ``kl`` is the
    detached, clamped reference point ``z0`` (0 for apo_zero_unpaired or without KL rows).
    """
    import torch
    import torch.nn.functional as F

    labels = torch.as_tensor(labels, dtype=torch.bool, device=policy_logps.device)
    if loss_type == "kto" and kl_policy_logps is not None:
        kl = (kl_policy_logps - kl_ref_logps).mean().detach()
        kl = _mean_over_ranks(kl).clamp(min=0)
    else:
        kl = torch.zeros((), device=policy_logps.device, dtype=policy_logps.dtype)
    ratio = policy_logps - ref_logps
    chosen, rejected = ratio[labels], ratio[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - F.sigmoid(beta * chosen)
        rejected_losses = F.sigmoid(beta * rejected)
    else:
        raise ValueError(f"unknown KTO loss_type '{loss_type}'")
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, (beta * chosen).detach(), (beta * rejected).detach(), kl


def _mean_over_ranks(x: Any) -> Any:
    """The KL estimate averaged over the processes (TRL gathers it the same way)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        y = x.clone()
        dist.all_reduce(y)
        return y / dist.get_world_size()
    return x


def kto_logs(losses: Any, chosen_rewards: Any, rejected_rewards: Any, kl: Any,
             chosen_logps: Any = None, rejected_logps: Any = None) -> dict[str, float]:
    """What a KTO step logs (TRL's names); a side with no rows in the batch is left out."""
    out = {"kl": float(kl)}
    if chosen_rewards.numel():
        out["rewards/chosen"] = float(chosen_rewards.float().mean())
        if chosen_logps is not None:
            out["logps/chosen"] = float(chosen_logps.detach().float().mean())
    if rejected_rewards.numel():
        out["rewards/rejected"] = float(rejected_rewards.float().mean())
        if rejected_logps is not None:
            out["logps/rejected"] = float(rejected_logps.detach().float().mean())
    if chosen_rewards.numel() and rejected_rewards.numel():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# --------------------------------------------------------------------------- data
def tokenize_unpaired(tokenizer: Any, record: dict, *, max_length: int) -> dict:
    """``{"prompt_ids", "completion_ids", "completion_mask", "label"}`` of one canonical
    unpaired record; the prompt is cut from the left first when the row is too long."""
    from tunesmith.core.errors import DataError
    from tunesmith.core.render import render_chat, render_prompt
    from tunesmith.plugins.data.kto import split_completion

    prompt, completion, label = split_completion(record)
    full = render_chat(tokenizer, prompt + completion, max_length=None, completion_only=True)
    ids, labels = full["input_ids"], full["labels"]
    n_prompt = len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]) if prompt else 0
    mask = [1 if (lab != IGNORE_INDEX and i >= n_prompt) else 0 for i, lab in enumerate(labels)]
    p_ids, c_ids, c_mask = ids[:n_prompt], ids[n_prompt:], mask[n_prompt:]
    p_ids, c_ids, c_mask = _fit(p_ids, c_ids, c_mask, max_length)
    if not any(c_mask):
        meta = record.get("metadata") or {}
        raise DataError("the completion has no tokens left to score (empty, or the prompt fills max_length)",
                        path=meta.get("source"), line=meta.get("line") or meta.get("row"))
    return {"prompt_ids": p_ids, "completion_ids": c_ids, "completion_mask": c_mask, "label": bool(label)}


def _fit(p_ids: list, c_ids: list, c_mask: list, max_length: int) -> tuple[list, list, list]:
    """Prompt tokens dropped from the left, then the completion cut at the end, to fit."""
    over = len(p_ids) + len(c_ids) - max_length
    if over > 0:
        drop = min(over, len(p_ids))
        p_ids = p_ids[drop:]
        keep = max_length - len(p_ids)
        c_ids, c_mask = c_ids[:keep], c_mask[:keep]
    return p_ids, c_ids, c_mask


def tokenize_unpaired_records(tokenizer: Any, records: list[dict], *, max_length: int, skip_invalid: bool = True) -> list[dict]:
    from tunesmith.core.errors import DataError
    from tunesmith.plugins.data.kto import split_completion

    out, skipped = [], 0
    for rec in records:
        split_completion(rec)  # a row without a label or an assistant turn is an error, never skipped
        try:
            out.append(tokenize_unpaired(tokenizer, rec, max_length=max_length))
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        log.warning("skipped %d KTO row(s) with no completion tokens within max_length", skipped)
    if not out:
        raise DataError("no usable KTO rows")
    return out


class UnpairedCollator:
    """Pads unpaired rows into one batch (``input_ids``, ``attention_mask``,
    ``completion_mask``, ``labels``, ``label``) plus the KL rows: row ``i``'s prompt
    with row ``i-1``'s completion (``KL_input_ids``, ``KL_attention_mask``,
    ``KL_completion_mask``), the rotation TRL uses."""

    def __init__(self, pad_token_id: int, *, max_length: int, kl: bool = True) -> None:
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.kl = kl

    def _pad(self, rows: list[tuple[list, list]]) -> tuple[Any, Any, Any]:
        import torch

        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        comp = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r_ids, r_mask) in enumerate(rows):
            n = len(r_ids)
            ids[i, :n] = torch.tensor(r_ids, dtype=torch.long)
            attn[i, :n] = 1
            comp[i, :n] = torch.tensor(r_mask, dtype=torch.long)
        return ids, attn, comp

    def __call__(self, features: list[dict]) -> dict:
        import torch

        rows = [(f["prompt_ids"] + f["completion_ids"], [0] * len(f["prompt_ids"]) + f["completion_mask"]) for f in features]
        ids, attn, comp = self._pad(rows)
        batch = {
            "input_ids": ids, "attention_mask": attn, "completion_mask": comp,
            "labels": ids.masked_fill(comp == 0, IGNORE_INDEX),
            "label": torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool),
        }
        if self.kl:
            kl_rows = []
            for i, f in enumerate(features):
                other = features[i - 1]  # i = 0 takes the last row: (x_1, y_n), (x_2, y_1), ...
                p, c, m = _fit(f["prompt_ids"], other["completion_ids"], other["completion_mask"], self.max_length)
                kl_rows.append((p + c, [0] * len(p) + m))
            batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"] = self._pad(kl_rows)
        return batch


# --------------------------------------------------------------------------- the loss plugin
def _reference(model: Any, options: KTOOptions) -> Any:
    """None (the adapter is disabled for the reference) or a frozen copy (full fine-tuning)."""
    import copy

    from tunesmith.core.errors import ConfigError
    from tunesmith.plugins.losses.dpo import _unwrap, is_peft_model

    peft = is_peft_model(_unwrap(model))
    if options.reference == "adapter_disabled" or (options.reference == "auto" and peft):
        if not peft:
            raise ConfigError("reference: adapter_disabled needs a PEFT method (peft.method is full)", key="losses")
        return None
    ref = copy.deepcopy(_unwrap(model))
    ref.eval()
    ref.requires_grad_(False)
    return ref


class KTOLoss:
    name = "kto"
    description = "KTO on unpaired feedback rows (desirable/undesirable weights, KL reference point)."
    requires = "unpaired"
    Options = KTOOptions

    def setup(self, model: Any, options: KTOOptions, context: Any) -> None:
        state = context.state if context is not None else {}
        if REF_STATE_KEY not in state:
            state[REF_STATE_KEY] = _reference(model, options)

    def compute(self, model: Any, batch: dict, options: KTOOptions, context: Any) -> tuple[Any, dict]:
        import torch

        from tunesmith.plugins.losses.dpo import reference_logps, sequence_logps

        state = context.state if context is not None else {}
        if REF_STATE_KEY not in state:
            self.setup(model, options, context)
        ref_model = state.get(REF_STATE_KEY)
        if ref_model is not None and next(ref_model.parameters()).device != batch["input_ids"].device:
            ref_model.to(batch["input_ids"].device)
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = reference_logps(model, ref_model, batch)
        kl_pol = kl_ref = None
        if options.loss_type == "kto" and "KL_input_ids" in batch:
            kl_batch = {"input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"],
                        "completion_mask": batch["KL_completion_mask"]}
            with torch.no_grad():
                kl_pol, _ = sequence_logps(model, kl_batch["input_ids"], kl_batch["attention_mask"], kl_batch["completion_mask"])
            kl_ref = reference_logps(model, ref_model, kl_batch)
        labels = batch["label"].to(logps.device).bool()
        losses, cr, rr, kl = kto_loss(
            logps, ref, labels, kl_pol, kl_ref, beta=options.beta, loss_type=options.loss_type,
            desirable_weight=options.desirable_weight, undesirable_weight=options.undesirable_weight,
        )
        return losses.nanmean(), kto_logs(losses, cr, rr, kl, logps[labels], logps[~labels])


# --------------------------------------------------------------------------- the objective
def _loss_options(losses: list) -> KTOOptions | None:
    for name, plugin, opts, _w in losses:
        if getattr(plugin, "requires", None) == "unpaired" and isinstance(opts, KTOOptions):
            return opts
    return None


def weight_advice(n_desirable: int, n_undesirable: int, options: KTOOptions) -> str | None:
    """The KTO paper's advice (Eq. 8, as TRL checks it) when the classes are unbalanced:
    ``w_d * n_d / (w_u * n_u)`` should lie in [1, 4/3]; None when the weights fit."""
    nd, nu = max(n_desirable, 1), max(n_undesirable, 1)
    if nd == nu:
        return None
    d_lo, d_hi = round(nu * options.undesirable_weight / nd, 2), round(nu * options.undesirable_weight / nd * 1.33, 2)
    u_lo, u_hi = round(nd * options.desirable_weight / nu / 1.33, 2), round(nd * options.desirable_weight / nu, 2)
    if d_lo <= options.desirable_weight <= d_hi or u_lo <= options.undesirable_weight <= u_hi:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable rows: set EITHER desirable_weight in "
            f"[{d_lo}, {d_hi}] or undesirable_weight in [{u_lo}, {u_hi}] (KTO paper, Eq. 8)")


class KTO:
    name = "kto"
    description = "Kahneman-Tversky optimisation on unpaired thumbs-up/down rows (or unpaired preference pairs)"
    batch_kind = "unpaired"
    default_losses = ("kto",)
    learning_rate_scale = 0.1

    def check(self, cfg: Any, options: Any, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError
        from tunesmith.core.session import section_options

        opts = KTOOptions()
        for spec in cfg.losses or []:
            if spec.plugin_name == "kto":
                opts = section_options(registries.losses.get("kto"), spec)
        if opts.loss_type == "kto" and cfg.training.batch_size < 2:
            raise ConfigError(
                "KTO estimates its KL reference point from the other rows of a batch: training.batch_size must be "
                "at least 2 (or use losses: [{name: kto, loss_type: apo_zero_unpaired}])",
                key="training.batch_size", source=cfg.source,
            )

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.preference import final_logs
        from tunesmith.core.training import ListDataset, eval_summary
        from tunesmith.plugins.data.kto import unpair_records

        cfg = session.cfg
        opts = _loss_options(session.losses) or KTOOptions()
        model, tok = session.prepare_model()
        train_recs, eval_recs, source = session.records()
        paired = any("chosen" in r for r in train_recs)
        train_recs, eval_recs = list(unpair_records(train_recs)), list(unpair_records(eval_recs))
        max_length = cfg.training.max_length
        train_rows = tokenize_unpaired_records(tok, train_recs, max_length=max_length)
        eval_rows = tokenize_unpaired_records(tok, eval_recs, max_length=max_length) if eval_recs else []
        n_des = sum(r["label"] for r in train_rows)
        n_und = len(train_rows) - n_des
        session.say(f"kto: {n_des} desirable and {n_und} undesirable rows" + (" (unpaired from preference pairs)" if paired else ""))
        if n_des == 0 or n_und == 0:
            log.warning("kto: the training rows are all %s; KTO learns from both kinds", "desirable" if n_und == 0 else "undesirable")
        advice = weight_advice(n_des, n_und, opts)
        if advice:
            session.say(f"warning: {advice}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        collator = UnpairedCollator(pad, max_length=max_length, kl=opts.loss_type == "kto")
        lr = session.learning_rate(len(train_rows))
        eval_ds = ListDataset(eval_rows) if eval_rows else None
        args = session.training_arguments(
            has_eval=eval_ds is not None, learning_rate=lr, prediction_loss_only=True, label_names=["labels"],
        )
        trainer, out, runtime = session.run_trainer(args=args, train_ds=ListDataset(train_rows), eval_ds=eval_ds, collator=collator)
        fields: dict[str, Any] = {
            "train_loss": float(out.training_loss),
            "steps": int(trainer.state.global_step),
            "runtime_s": round(runtime, 2),
            "tokens": int(trainer.tokens_seen),
            "learning_rate": float(lr),
            "rows": len(train_rows),
            "desirable": n_des,
            "undesirable": n_und,
            "data": source,
        }
        fields.update({f"final/{k}": v for k, v in final_logs(trainer.state.log_history, "kto").items()})
        fields.update(eval_summary(trainer.state.log_history))
        session.save_final(
            trainer.accelerator.unwrap_model(trainer.model), fields,
            losses=[{"name": n, "weight": w} for n, _, _, w in session.losses],
        )
        return fields


@hookimpl
def register_objectives(register: Any) -> None:
    register(KTO())


@hookimpl
def register_losses(register: Any) -> None:
    register(KTOLoss())
