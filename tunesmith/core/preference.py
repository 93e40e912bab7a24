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


# --------------------------------------------------------------------------- models
def _prepare_reward_model(cfg: Any, registries: Any, context: Any) -> tuple[Any, Any, Any, Any]:
    """A sequence classifier with one output over the base model, PEFT applied.

    PEFT-library methods (lora, dora, qlora, ...) get ``task_type=SEQ_CLS`` so the new
    ``score`` head is trained and saved with the adapter (``modules_to_save``).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.core.models import describe_trainable, pick_dtype, resolve_model_dir, setup_tokenizer
    from tunesmith.core.training import _say, peft_options

    method = registries.peft_methods.get(cfg.peft.method)
    options = peft_options(cfg, method)
    base_dir = resolve_model_dir(cfg, registries)
    quant = method.quantization_config(options) if hasattr(method, "quantization_config") else None
    dtype = cfg.model.dtype
    if dtype == "auto" and cfg.training.precision == "fp32":
        dtype = "float32"
    tok = setup_tokenizer(AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False))
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype), "num_labels": 1, "trust_remote_code": False}
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    context.model, context.tokenizer = model, tok
    context.state["base_params"] = sum(p.numel() for p in model.parameters())
    if hasattr(method, "peft_config"):
        from peft import get_peft_model

        model = method.prepare(model, options, context) if hasattr(method, "prepare") else model
        pcfg = method.peft_config(model, options, context)
        pcfg.task_type = "SEQ_CLS"
        if getattr(pcfg, "modules_to_save", None) is None:
            pcfg.modules_to_save = ["score"]
        elif "score" not in pcfg.modules_to_save:
            pcfg.modules_to_save = list(pcfg.modules_to_save) + ["score"]
        model = get_peft_model(model, pcfg)
    else:
        model = method.apply(model, options, context)
        head = getattr(model, "score", None)
        if head is not None:
            head.requires_grad_(True)
    context.model = model
    _say(describe_trainable(model, method))
    return model, tok, method, base_dir


# --------------------------------------------------------------------------- training
def _final_logs(history: list[dict], prefix: str) -> dict:
    """The last logged value of each ``<prefix>/...`` key."""
    out: dict[str, float] = {}
    for row in history:
        for k, v in row.items():
            if k.startswith(prefix + "/") and isinstance(v, (int, float)):
                out[k[len(prefix) + 1 :]] = float(v)
    return out


def _train_pairs(cfg: Any, registries: Any, *, resume: bool, objective: str) -> dict:
    import shutil
    from pathlib import Path

    from transformers import set_seed

    from tunesmith.core.context import RunContext
    from tunesmith.core.io import atomic_write_json
    from tunesmith.core.rundir import RunDir
    from tunesmith.core.training import (
        CHECKPOINT_RE,
        ListDataset,
        _say,
        auto_learning_rate,
        build_training_arguments,
        final_info,
        last_checkpoint,
        peft_options,
        prepare_model,
        run_trainer,
        save_final,
        training_records,
    )

    # the losses are checked before anything heavy is loaded
    checked = check_loss_requirements(cfg, registries, "pairs")
    losses = [(spec.plugin_name if spec is not None else plugin.name, plugin, opts, w) for spec, plugin, w, opts in checked]
    main_loss = next(name for name, plugin, _, _ in losses if getattr(plugin, "requires", None) == "pairs")

    run = RunDir.for_config(cfg)
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(run.root)
        _say(f"resuming from {checkpoint}" if checkpoint else
             f"--resume: no complete checkpoint in {run.checkpoints_dir}; starting from the beginning")
    elif run.checkpoints_dir.exists() and any(CHECKPOINT_RE.match(p.name) for p in run.checkpoints_dir.iterdir()):
        _say(f"note: {run.checkpoints_dir} has checkpoints of an earlier run; they are replaced (use --resume to continue)")
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        if run.metrics_path.exists():
            run.metrics_path.unlink()
    run.ensure()
    run.write_config(cfg)
    set_seed(cfg.training.seed)
    context = RunContext(config=cfg, run_dir=run.root, registries=registries)
    context.state["resume"] = checkpoint is not None
    context.state["objective"] = objective

    if objective == "reward":
        model, tok, method, base_dir = _prepare_reward_model(cfg, registries, context)
    else:
        model, tok, method, base_dir = prepare_model(cfg, registries, context)
    train_recs, eval_recs, source = training_records(cfg, registries, run)
    max_length = cfg.training.max_length
    train_ds = ListDataset(tokenize_pairs(tok, train_recs, max_length=max_length))
    eval_ds = ListDataset(tokenize_pairs(tok, eval_recs, max_length=max_length)) if eval_recs else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collator = PairCollator(pad)

    lr = cfg.training.learning_rate
    if lr == "auto":
        lr, why = auto_learning_rate(cfg.peft.method, context.state.get("base_params", 0), len(train_recs), objective=objective)
        if objective == "dpo":
            lr, why = lr * 0.1, why + f" x0.1 (DPO) = {lr * 0.1:.3g}"
        _say(f"learning_rate auto: {why}")
    args = build_training_arguments(
        cfg, run, has_eval=eval_ds is not None, learning_rate=float(lr),
        prediction_loss_only=True, label_names=["labels"],
    )
    method_opts = peft_options(cfg, method)
    trainer, out, runtime = run_trainer(
        cfg, context, model=model, tok=tok, method=method, method_opts=method_opts, args=args,
        train_ds=train_ds, eval_ds=eval_ds, collator=collator, losses=losses, batch_kind="pairs",
        checkpoint=checkpoint,
    )
    result: dict[str, Any] = {
        "run_dir": str(run.root),
        "output_path": str(run.final_dir),
        "objective": objective,
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "runtime_s": round(runtime, 2),
        "tokens": int(trainer.tokens_seen),
        "learning_rate": float(lr),
        "pairs": len(train_ds),
        "data": source,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "stop_reason": context.stop_reason,
    }
    result.update({f"final/{k}": v for k, v in _final_logs(trainer.state.log_history, main_loss).items()})
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals:
        result["eval_loss"] = float(evals[-1]["eval_loss"])
    if trainer.is_world_process_zero():
        info = final_info(
            cfg, registries, base_dir=base_dir, method=method, method_opts=method_opts, model=model, tok=tok,
            result=result, objective=objective,
            head="sequence_classification" if objective == "reward" else "causal_lm",
            losses=[{"name": n, "weight": w} for n, _, _, w in losses],
        )
        save_final(trainer.accelerator.unwrap_model(trainer.model), tok, method, run, info)
        atomic_write_json(Path(run.root) / "train_result.json", result)
    context.emit("after_train", result=result)
    _say(f"trained {result['steps']} steps ({objective}) in {runtime:.0f}s; loss {result['train_loss']:.4f}; saved {run.final_dir}")
    return result


def train_dpo(cfg: Any, registries: Any = None, *, resume: bool = False) -> dict:
    """``objective: dpo``: preference pairs, the ``dpo`` loss (plus any regulariser such as
    ``ewc``), reference log-probs from the adapter-disabled model or a frozen copy.

    Returns the result dict (``train_loss``, ``steps``, ``final/rewards/accuracies``, ...).
    """
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries(disable=tuple(cfg.plugins.disable), strict=cfg.plugins.strict)
    return _train_pairs(cfg, registries, resume=resume, objective="dpo")


def train_reward(cfg: Any, registries: Any = None, *, resume: bool = False) -> dict:
    """``objective: reward``: a scalar-head reward model trained with the pairwise
    Bradley-Terry loss (``reward_model``); ``RUN/final`` loads with
    ``tunesmith.plugins.rewards.reward_model.load_reward_model``."""
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries(disable=tuple(cfg.plugins.disable), strict=cfg.plugins.strict)
    return _train_pairs(cfg, registries, resume=resume, objective="reward")
