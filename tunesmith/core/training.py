"""Training machinery on transformers' Trainer, shared by the objectives.

The objectives themselves are plugins (``tunesmith/plugins/objectives/``); they run
inside :class:`tunesmith.core.session.TrainingSession`.

Reusable pieces (the preference and RL trainers build on them)
---------------------------------------------------------------
* :func:`train_on_tokens` - what the token objectives (``sft``, ``cpt``) run:
  tokenise, batch, train through :class:`TunesmithTrainer`, save.
* :func:`build_training_arguments` - ``TrainingArguments`` from ``cfg.training``
  (checkpoints under ``RUN/checkpoints``, precision, schedules, eval/save cadence);
  keyword overrides win.
* :class:`TunesmithTrainer` - a ``transformers.Trainer`` whose loss is the weighted
  sum of the configured loss plugins, with atomic checkpoints.
* :func:`standard_callbacks` - metrics.jsonl + TensorBoard, loss PNG, progress bar
  (loss, tokens/s, ETA), lifecycle hooks, early stopping.
* :func:`save_final` - ``RUN/final/``: adapter or model, tokenizer, ``tunesmith.json``.
* :func:`last_checkpoint` - the newest *complete* checkpoint of a run.

The loss contract
-----------------
Each configured loss (``losses: [{name, weight, ...}]``; default ``causal_lm``)
is a plugin with ``compute(model, batch, options, context) -> (tensor, logs)``.
``batch`` is a :class:`LossBatch`: a dict of the collated tensors (``input_ids``,
``labels``, ``attention_mask`` or ``position_ids``; a pairs trainer puts its own
keys) with attributes

* ``num_items_in_batch`` - labelled tokens (after the causal shift) of the whole
  *accumulated* batch over every device, or None;
* ``accumulation_steps`` and ``world_size``;
* ``forward(model)`` - the model's forward pass on the batch, run once and shared
  by every loss (it passes ``labels`` and ``num_items_in_batch``, so
  ``outputs.loss`` is the token-weighted cross-entropy);
* ``token_loss(model, label_smoothing=0.0)`` - the same token-weighted
  cross-entropy, but the output head runs only at the labelled positions: with
  completion-only labels most positions are prompt, and their vocabulary-sized
  logits (and the softmax over them) are never computed. Falls back to
  ``forward(model)`` where that is not possible (prompt-learning PEFT methods, a
  model without an output head module) and reuses it when it already ran.

Scaling: a loss that normalises by ``num_items_in_batch`` sets
``scaled_for_accumulation = True`` on the plugin object (the trainer then scales
it by the world size, as DDP averages gradients); any other term (a per-batch
mean, a regulariser like EWC that reads no batch) is divided by the accumulation
steps by the trainer. The total is ``sum(weight_i * term_i)``; each term is
logged as ``loss/<name>``. ``requires`` of a loss must match the batch kind
(``"tokens"`` here; ``None`` fits any). ``setup(model, options, context)`` runs
once before training when the plugin has it. ``context`` is the
:class:`~tunesmith.core.context.RunContext`; ``context.state`` is shared.

A PEFT method may offer ``callbacks(options, context) -> list[TrainerCallback]``
(gradual unfreezing uses it). Lifecycle hooks: ``before_train(run)``,
``after_step(run, step, logs)`` (any ``True`` stops training, as does
``run.request_stop(reason)``), ``after_train(run, result)``,
``on_train_error(run, error)``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.core import state_io
from tunesmith.core.context import RunContext
from tunesmith.core.errors import ConfigError, DataError, TunesmithError
from tunesmith.core.io import atomic_dir, atomic_open, atomic_write_json, atomic_write_text
from tunesmith.core.labelled import IGNORE_INDEX, labelled_forward, shifted_labels
from tunesmith.core.ranks import say
from tunesmith.core.registry import member
from tunesmith.core.rundir import RunDir

log = logging.getLogger("tunesmith.training")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- data
def training_records(cfg: Any, registries: Any, run: RunDir) -> tuple[list[dict], list[dict], str]:
    """(train records, eval records, where they came from).

    Prefers the prepared split of the run (``RUN/data/train.jsonl`` and
    ``validation.jsonl``, written by ``tunesmith data``/``run``); otherwise reads
    ``data.path`` / ``data.sources`` as they are, with ``data.validation_path`` for
    evaluation.
    """
    from tunesmith.core.data import load_records

    fmt_kw = {"registries": registries}
    train_file = run.data_dir / "train.jsonl"
    if train_file.exists():
        train = load_records(train_file, **fmt_kw)
        source = str(train_file)
        val_file = run.data_dir / "validation.jsonl"
        evals = load_records(val_file, **fmt_kw) if val_file.exists() else []
    else:
        paths: list[tuple[str, str]] = []
        if cfg.data.path:
            paths.append((cfg.data.path, cfg.data.format))
        for s in cfg.data.sources or []:
            paths.append((s.path, s.format))
        if not paths:
            raise ConfigError("no training data: set data.path (or data.sources)", key="data.path", source=cfg.source)
        train = []
        for p, f in paths:
            train.extend(load_records(cfg.resolve_path(p), format=f, skip_invalid=cfg.data.skip_invalid, **fmt_kw))
        source = ", ".join(p for p, _ in paths)
        evals = []
        if cfg.data.validation_path:
            evals = load_records(cfg.resolve_path(cfg.data.validation_path), **fmt_kw)
    if not train:
        raise DataError("the training data is empty", path=source)
    return train, evals, source


def _record_kind(r: dict) -> str:
    if "messages" in r:
        return "chat"
    if "chosen" in r:
        return "pairs"
    if "text" in r:
        return "text"
    return "unknown"


def tokenize_records(records: list[dict], tokenizer: Any, cfg: Any, *, continued: bool = False, objective: str = "sft") -> tuple[list[dict], dict]:
    """Token examples (``input_ids``, ``labels``) and counts: chat/text records with
    completion masks, or (``continued``) every token of the text, chunked to
    ``training.max_length`` (continued pre-training). ``objective`` names the run's
    objective in errors."""
    from tunesmith.core.render import chunk_tokens, render_chat, render_text

    t = cfg.training
    stats = {"records": len(records), "truncated": 0, "dropped_no_labels": 0}
    if continued:
        seqs = []
        for r in records:
            kind = _record_kind(r)
            text = r["text"] if kind == "text" else tokenizer.apply_chat_template(r["messages"], tokenize=False) if kind == "chat" else None
            if text is None:
                raise DataError("continued pre-training needs text or chat records, got preference pairs")
            seqs.append(render_text(tokenizer, text)["input_ids"])
        out = chunk_tokens(seqs, t.max_length)
        stats["examples"] = len(out)
        return out, stats
    out = []
    for r in records:
        kind = _record_kind(r)
        if kind == "chat":
            ex = render_chat(tokenizer, r["messages"], max_length=t.max_length,
                             completion_only=t.completion_only_loss, train_on_eos=t.train_on_eos)
        elif kind == "text":
            ex = render_text(tokenizer, r["text"], max_length=t.max_length)
        else:
            raise DataError(
                f"objective '{objective}' needs chat or text records, got {kind}",
                hint="preference pairs train with objective: dpo or reward",
            )
        stats["truncated"] += int(ex["truncated"])
        if ex["n_labels"] == 0:
            stats["dropped_no_labels"] += 1
            continue
        out.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if stats["dropped_no_labels"]:
        say(f"warning: {stats['dropped_no_labels']} examples have no trainable token after truncation to {t.max_length} and were dropped")
    if stats["truncated"]:
        say(f"warning: {stats['truncated']} examples were truncated to max_length {t.max_length}")
    if not out:
        raise DataError("no example has a trainable (assistant) token", hint="check the roles and training.max_length")
    stats["examples"] = len(out)
    return out, stats


class ListDataset:
    """A map-style dataset over a list of dicts (what the Trainer needs)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def build_datasets(examples: list[dict], cfg: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(dataset, collator) for the configured packing mode."""
    from tunesmith.core.render import TokenCollator, pack_examples

    mode = cfg.training.packing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if mode is True or mode == "pack":
        return ListDataset(pack_examples(examples, cfg.training.max_length)), TokenCollator(pad)
    if mode == "padding_free":
        return ListDataset(examples), TokenCollator(pad, padding_free=True)
    return ListDataset(examples), TokenCollator(pad)


# --------------------------------------------------------------------------- arguments
def precision_flags(precision: Any) -> dict:
    """``bf16``/``fp16``/``use_cpu`` for ``TrainingArguments``.

    ``precision`` is a resolved :class:`~tunesmith.core.precision.PrecisionChoice`
    (what :func:`build_training_arguments` passes: it knows the model) or a
    ``training.precision`` string; a bare ``auto`` without the model resolves as
    if the model size were unknown on a GPU and to fp32 autocast flags on a CPU
    (the frozen base's storage dtype, chosen by the session, carries bf16 there).
    """
    from tunesmith.core.precision import PrecisionChoice, choose_precision, detect_hardware

    if isinstance(precision, PrecisionChoice):
        return precision.trainer_flags()
    if precision == "auto" and detect_hardware().device == "cpu":
        return {"bf16": False, "fp16": False, "use_cpu": True}
    return choose_precision(precision).trainer_flags()


def build_training_arguments(cfg: Any, run_dir: str | Path | RunDir, *, has_eval: bool = False, learning_rate: float | None = None, **overrides: Any) -> Any:
    """``TrainingArguments`` for ``cfg.training``; ``overrides`` win (e.g. ``output_dir``)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    lr = learning_rate if learning_rate is not None else (t.learning_rate if t.learning_rate != "auto" else 2e-4)
    from tunesmith.core.precision import resolve_precision

    flags = precision_flags(resolve_precision(cfg))
    cuda = torch.cuda.is_available()
    eval_on = has_eval and t.eval_steps > 0
    save_steps = t.save_steps
    load_best = bool(t.load_best_model_at_end and eval_on)
    if load_best and save_steps % t.eval_steps:
        save_steps = max(t.eval_steps, (save_steps // t.eval_steps) * t.eval_steps)
    sched_kwargs = dict(getattr(t, "lr_scheduler_kwargs", None) or {})
    warmup: float | int = t.warmup_steps if t.warmup_steps > 0 else float(t.warmup_ratio)
    kwargs: dict[str, Any] = dict(
        output_dir=str(run.checkpoints_dir),
        num_train_epochs=float(t.epochs),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=float(lr),
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=sched_kwargs,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        tf32=bool(t.tf32) if cuda else None,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss" if load_best or eval_on else None,
        greater_is_better=False if eval_on else None,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.num_workers,
        remove_unused_columns=False,
        report_to="none",  # tunesmith writes TensorBoard and metrics.jsonl itself
        disable_tqdm=True,  # replaced by the progress callback (loss, tokens/s, ETA)
        train_sampling_strategy="group_by_length" if t.packing == "group_by_length" else "random",
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        **flags,
    )
    if t.optimizer != "auto":
        kwargs["optim"] = t.optimizer
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# --------------------------------------------------------------------------- trainer
class LossBatch(dict):
    """The collated batch plus what a loss needs to scale itself (see the module docstring)."""

    num_items_in_batch: Any = None
    accumulation_steps: int = 1
    world_size: int = 1
    _outputs: Any = None

    _token_loss: Any = None

    def _model_inputs(self, labels: bool = True) -> dict:
        keys = ("input_ids", "attention_mask", "position_ids", "inputs_embeds") + (("labels",) if labels else ())
        return {k: v for k, v in self.items() if k in keys}

    def forward(self, model: Any) -> Any:
        if self._outputs is None:
            kwargs = self._model_inputs()
            if self.num_items_in_batch is not None and "labels" in kwargs:
                kwargs["num_items_in_batch"] = self.num_items_in_batch
            self._outputs = model(**kwargs, use_cache=False)
        return self._outputs

    def token_loss(self, model: Any, label_smoothing: float = 0.0) -> Any:
        """Token-weighted cross-entropy of the labelled tokens (see the module docstring)."""
        import torch.nn.functional as F

        if self._outputs is None and self._token_loss is None:
            self._token_loss = labelled_forward(model, self._model_inputs(labels=False), self["labels"])
        if self._token_loss is not None:
            logits, targets = self._token_loss
        else:
            out = self.forward(model)
            if label_smoothing == 0.0 and getattr(out, "loss", None) is not None:
                return out.loss
            labels = self["labels"]
            logits = out.logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
            targets = shifted_labels(labels)
            keep = targets.ne(IGNORE_INDEX)
            logits, targets = logits[keep], targets[keep]
        n = self.num_items_in_batch if self.num_items_in_batch is not None else max(targets.numel(), 1)
        total = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum", label_smoothing=label_smoothing)
        return total / n


class SafeCheckpoints:
    """Trainer mixin: atomic, pickle-free checkpoints.

    Each checkpoint is written to ``.staging-N`` and renamed to ``checkpoint-N`` when
    complete (with a ``COMPLETE`` marker); optimiser, scheduler, scaler and RNG states
    are safetensors + JSON (:mod:`tunesmith.core.state_io`) instead of transformers'
    ``torch.save`` files, and ``training_args.bin`` becomes ``training_args.json``.
    Resuming reads these (or a plain Trainer's files). Put it before the Trainer
    class in the bases: ``class T(SafeCheckpoints, Trainer)`` (TRL trainers too).
    """

    # -- training state without pickle (see tunesmith.core.state_io) ---
    def _plain_state(self) -> bool:
        """DeepSpeed and FSDP write their own (sharded) state: those stay transformers'."""
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _rng_rank(self) -> int | None:
        return self.args.process_index if self.args.world_size > 1 else None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            state_io.save_optimizer(self.optimizer, output_dir)
            state_io.save_state_dict_json(self.lr_scheduler, Path(output_dir) / state_io.SCHEDULER_FILE)

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            state_io.save_state_dict_json(scaler, Path(output_dir) / state_io.SCALER_FILE)

    def _save_rng_state(self, output_dir: str) -> None:
        state_io.save_rng_state(output_dir, self._rng_rank())

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        from tunesmith.core.templates import adapter_save_kwargs

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        extra = adapter_save_kwargs(model)
        if extra:
            # a template added tokens: the checkpoint, like the final adapter, keeps the
            # trained rows (peft trainable tokens), not both full embedding matrices
            model.save_pretrained = functools.partial(type(model).save_pretrained, model, **extra)
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__dict__.pop("save_pretrained", None)
        out = Path(output_dir or self.args.output_dir)
        args_bin = out / "training_args.bin"  # torch.save(args): pickle
        if args_bin.exists():
            args_bin.unlink()
            atomic_write_text(out / "training_args.json", self.args.to_json_string())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self._plain_state() and state_io.has_optimizer(checkpoint):
            state_io.load_optimizer(self.optimizer, checkpoint)
            sched = Path(checkpoint) / state_io.SCHEDULER_FILE
            if sched.is_file():
                state_io.load_state_dict_json(self.lr_scheduler, sched)
            return
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        path = Path(checkpoint) / state_io.SCALER_FILE if checkpoint else None
        if path is not None and path.is_file() and getattr(self.accelerator, "scaler", None) is not None:
            state_io.load_state_dict_json(self.accelerator.scaler, path)
            return
        super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and state_io.load_rng_state(checkpoint, self._rng_rank()):
            return
        super()._load_rng_state(checkpoint)

    # -- atomic checkpoints ------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        step = self.state.global_step
        final_parent = Path(self.args.output_dir)
        staging_parent = final_parent / f".staging-{step}"
        orig = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging_parent)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = orig  # type: ignore[method-assign]
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.state.best_global_step:
            best = final_parent / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if self.state.best_global_step == step or best.exists():
                self.state.best_model_checkpoint = str(best)
        if self.args.should_save:
            staged = staging_parent / name
            self.state.save_to_json(str(staged / "trainer_state.json"))
            (staged / "COMPLETE").write_text(str(step), encoding="utf-8")
            target = final_parent / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
            shutil.rmtree(staging_parent, ignore_errors=True)
            try:
                fd = os.open(final_parent, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
            rotate_checkpoints(final_parent, self.args.save_total_limit, self.state.best_model_checkpoint)
        if self.args.parallel_mode.value == "distributed":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()


def make_trainer_class() -> type:
    """The Trainer subclass (built lazily so importing this module stays light)."""
    from transformers import Trainer

    class _TunesmithTrainer(SafeCheckpoints, Trainer):
        """transformers' Trainer with pluggable weighted losses and atomic checkpoints.

        ``losses`` is a list of ``(name, plugin, options, weight)``; ``run`` the RunContext.
        """

        def __init__(self, *args: Any, losses: list[tuple[str, Any, Any, float]] | None = None,
                     run: RunContext | None = None, batch_kind: str = "tokens", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not losses:
                raise TunesmithError("TunesmithTrainer needs losses: [(name, loss plugin, options, weight)] "
                                     "(the session resolves them: session.losses)")
            self.tunesmith_losses = losses
            self.run = run
            self.batch_kind = batch_kind
            self.loss_is_scaled_for_ga = True
            self._term_sums: dict[str, float] = {}
            self._last_log_step = 0
            self.tokens_seen = 0

        # -- loss -------------------------------------------------------
        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            batch = LossBatch(inputs)
            batch.num_items_in_batch = num_items_in_batch
            batch.accumulation_steps = self.current_gradient_accumulation_steps if model.training else 1
            world = self.accelerator.num_processes
            batch.world_size = world
            if model.training:
                before = self.tokens_seen
                if "attention_mask" in inputs:
                    self.tokens_seen += int(inputs["attention_mask"].sum())
                elif "input_ids" in inputs:
                    self.tokens_seen += int(inputs["input_ids"].numel())
                self._step_clock(model, self.tokens_seen - before)
            total = None
            with self._attention_context(model):
                terms = [(name, plugin, weight, *plugin.compute(model, batch, options, self.run))
                         for name, plugin, options, weight in self.tunesmith_losses]
            for name, plugin, weight, value, logs in terms:
                scaled = bool(member(plugin, "losses", "scaled_for_accumulation")) and num_items_in_batch is not None
                if model.training:
                    if scaled:
                        if self.args.average_tokens_across_devices and world > 1:
                            value = value * world
                    else:
                        value = value / batch.accumulation_steps
                    self._term_sums[f"loss/{name}"] = self._term_sums.get(f"loss/{name}", 0.0) + float(value.detach())
                    for k, v in (logs or {}).items():
                        key = f"{name}/{k}"
                        self._term_sums[key] = self._term_sums.get(key, 0.0) + float(v) / batch.accumulation_steps
                term = value * weight if weight != 1.0 else value
                total = term if total is None else total + term
            if return_outputs:
                # losses that run their own forward passes (DPO, reward) leave no
                # model outputs: give the evaluation loop a dict with the loss only
                outputs = batch._outputs if batch._outputs is not None else {"loss": total.detach()}
                return total, outputs
            return total

        def _attention_context(self, model: Any) -> Any:
            """bf16 training on a CPU: attention in fp32 (faster there, see core/precision.py)."""
            import contextlib

            if model.training and self.args.bf16 and self.args.device.type == "cpu":
                from tunesmith.core.precision import cpu_attention_in_fp32

                return cpu_attention_in_fp32()
            return contextlib.nullcontext()

        # -- training.compile --------------------------------------------
        def _step_clock(self, model: Any, tokens: int) -> None:
            """On the first training batch: decide ``training.compile`` (core/compile.py)
            and compile the repeated blocks when it says so; then time every step
            (the measured costs inform later runs' ``auto``)."""
            clock = getattr(self, "_clock", None)
            if clock is None:
                clock = self._clock = self._setup_compile(model, tokens)
            if clock is not False and tokens:
                clock.tick(tokens)

        def _setup_compile(self, model: Any, tokens: int) -> Any:
            from tunesmith.core import compile as tcompile
            from tunesmith.core.precision import resolve_precision

            cfg = getattr(self.run, "config", None)
            if cfg is None or not hasattr(cfg, "training"):
                return False
            mode = getattr(cfg.training, "compile", "off")
            inner = self.accelerator.unwrap_model(model)
            device = "cuda" if next(inner.parameters()).is_cuda else "cpu"
            compute = resolve_precision(cfg, getattr(self.run, "registries", None), quiet=True).compute
            signature = tcompile.model_signature(inner, device, compute)
            decision = tcompile.decide_compile(
                mode, steps=max(int(self.state.max_steps or 0) - int(self.state.global_step or 0), 0),
                tokens_per_step=float(tokens) * max(int(self.args.gradient_accumulation_steps), 1), device=device,
                n_params=sum(p.numel() for p in inner.parameters()), record=tcompile.read_records().get(signature),
            )
            compiled = False
            if decision.compile:
                compiled = tcompile.compile_blocks(inner) > 0
            say(decision.line(mode) + ("" if compiled or not decision.compile else "; no repeated blocks to compile"))
            return tcompile.StepClock(signature, compiled)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs and self._term_sums:
                steps = max(1, self.state.global_step - self._last_log_step)
                if len(self.tunesmith_losses) > 1 or any(not k.startswith("loss/") for k in self._term_sums):
                    for k, v in self._term_sums.items():
                        logs[k] = round(v / steps, 6)
                self._term_sums = {}
                self._last_log_step = self.state.global_step
            super().log(logs, start_time) if start_time is not None else super().log(logs)

    return _TunesmithTrainer


def rotate_checkpoints(folder: Path, limit: int | None, best: str | None) -> None:
    if not limit or limit <= 0:
        return
    cps = sorted(
        (p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)),
        key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    keep = set(cps[-limit:])
    if best and Path(best) in cps:
        keep.add(Path(best))
        while len(keep) > max(limit, 2 if limit == 1 else limit):
            oldest = min((p for p in keep if str(p) != best), key=lambda p: int(p.name.split("-")[1]))
            keep.discard(oldest)
    for p in cps:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


class _LazyTrainer:
    """``TunesmithTrainer`` resolves to the Trainer subclass on first use."""

    _cls: type | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls(*args, **kwargs)

    @property
    def cls(self) -> type:
        if _LazyTrainer._cls is None:
            _LazyTrainer._cls = make_trainer_class()
        return _LazyTrainer._cls

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self.cls)


#: ``TunesmithTrainer(model=..., args=..., losses=[(name, plugin, options, weight)], run=ctx, ...)``
TunesmithTrainer = _LazyTrainer()


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (``checkpoint-N`` with its trainer state)."""
    run = RunDir(Path(run_dir))
    folder = run.checkpoints_dir if run.checkpoints_dir.exists() else Path(run_dir)
    if not folder.exists():
        return None
    cps = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").exists()]
    if not cps:
        return None
    return max(cps, key=lambda p: int(p.name.split("-")[1]))


# --------------------------------------------------------------------------- callbacks
def standard_callbacks(cfg: Any, run: RunDir, context: RunContext, *, has_eval: bool, total_tokens_hint: int | None = None) -> list[Any]:
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Metrics(TrainerCallback):
        """Every logged row to the session's loggers (metrics.jsonl, TensorBoard, MLflow,
        ... - ``training.report_to``) and the ``after_log`` hooks; loss.png."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.t0 = time.time()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            if run.metrics_path.exists():  # resumed: keep rows up to the checkpoint's step
                for line in run.metrics_path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row.get("step", 0) <= state.global_step:
                        self.rows.append(row)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time_s": round(time.time() - self.t0, 2)}
            row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()})
            self.rows.append(row)
            session = context.state.get("session")
            if session is not None:
                session.log_row(row)
            else:  # a Trainer built outside a training session
                atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
                context.emit("after_log", step=state.global_step, logs=dict(row))
            if "eval_loss" in logs:
                plot_loss(self.rows, run.plots_dir / "loss.png")

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            plot_loss(self.rows, run.plots_dir / "loss.png")

    class Progress(TrainerCallback):
        """A tqdm bar: loss, real tokens/s and ETA."""

        def __init__(self) -> None:
            self.bar = None
            self.t0 = 0.0
            self.tok0 = 0
            self.loss = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero and os.environ.get("TUNESMITH_NO_PROGRESS") != "1":
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
            self.t0 = time.time()
            self.tok0 = getattr(context.state.get("trainer"), "tokens_seen", 0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is None:
                return
            tr = context.state.get("trainer")
            dt = max(time.time() - self.t0, 1e-6)
            seen = getattr(tr, "tokens_seen", None)
            tps = (seen - self.tok0) / dt if seen is not None else 0.0
            post = {"tok/s": f"{tps:.0f}"} if tps else {}
            if self.loss is not None:
                post["loss"] = f"{self.loss:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    class Hooks(TrainerCallback):
        """Lifecycle hooks: after_step each step; any True (or run.request_stop) stops."""

        def __init__(self) -> None:
            self.last_logs: dict = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs:
                self.last_logs = dict(logs)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            results = context.emit("after_step", step=state.global_step, logs=dict(self.last_logs))
            self.last_logs = {}
            if any(r is True for r in results):
                context.stop_reason = context.stop_reason or "a plugin's after_step asked to stop"
            if context.stop_reason:
                control.should_training_stop = True
                control.should_save = True

    cbs: list[Any] = [Metrics(), Progress(), Hooks()]
    es = cfg.training.early_stopping
    if has_eval and es is not None and cfg.training.eval_steps > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=es.patience, early_stopping_threshold=es.threshold))
    return cbs


def plot_loss(rows: list[dict], path: Path) -> Path | None:
    """Train and eval loss against the step, as a PNG (written atomically)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- saving
def save_final(model: Any, tokenizer: Any, method: Any, run: RunDir, info: dict) -> Path:
    """Write ``RUN/final/`` atomically: adapter/model, tokenizer, tunesmith.json."""
    from tunesmith.core.models import INFO_FILE

    inner = model
    with atomic_dir(run.final_dir, overwrite=True) as tmp:
        if hasattr(inner, "config"):
            inner.config.use_cache = True
        method.save(inner, tmp)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / INFO_FILE, info)
    return run.final_dir


def model_info(cfg: Any, registries: Any) -> dict:
    """The ``model:`` section with the model source's resolved options (for tunesmith.json)."""
    from tunesmith.core.models import source_options

    data = cfg.model.model_dump(mode="json")
    try:
        _, opts = source_options(cfg.model, registries, base_dir=cfg.base_dir)
        if opts is not None:
            data.update(opts.model_dump(mode="json"))
    except Exception:  # noqa: BLE001 - informational only
        pass
    return data


def steady_tokens_per_s(trainer: Any) -> float | None:
    """Tokens/s of the training steps after the first (the first carries compile and
    warm-up); None when the run was too short to tell."""
    clock = getattr(trainer, "_clock", None)
    value = clock.steady_tokens_per_s() if clock else None
    return round(value, 1) if value else None


# --------------------------------------------------------------------------- the token objectives
def train_on_tokens(session: Any, *, continued: bool = False) -> dict:
    """Train a token objective inside ``session``: chat/text records with completion
    masks (``sft``), or every token of the text chunked to max_length (``cpt``,
    ``continued=True``); returns the objective's result fields."""
    cfg = session.cfg
    model, tok = session.prepare_model()
    train_recs, eval_recs, source = session.records()
    name = session.name
    examples, stats = tokenize_records(train_recs, tok, cfg, continued=continued, objective=name)
    eval_examples = tokenize_records(eval_recs, tok, cfg, continued=continued, objective=name)[0] if eval_recs else []
    train_ds, collator = build_datasets(examples, cfg, tok)
    eval_ds = build_datasets(eval_examples, cfg, tok)[0] if eval_examples else None
    if cfg.training.packing is True:
        eval_ds = ListDataset(eval_examples) if eval_examples else None
    lr = session.learning_rate(len(train_recs))
    args = session.training_arguments(has_eval=eval_ds is not None, learning_rate=lr)
    trainer, out, runtime = session.run_trainer(args=args, train_ds=train_ds, eval_ds=eval_ds, collator=collator)
    fields: dict[str, Any] = {
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "runtime_s": round(runtime, 2),
        "tokens": int(trainer.tokens_seen),
        "tokens_per_s": round(trainer.tokens_seen / max(runtime, 1e-9), 1),
        "steady_tokens_per_s": steady_tokens_per_s(trainer),
        "learning_rate": float(lr),
        "examples": stats.get("examples"),
        "data": source,
    }
    fields.update(eval_summary(trainer.state.log_history))
    session.save_final(trainer.accelerator.unwrap_model(trainer.model), fields)
    return fields


def eval_summary(history: list[dict]) -> dict:
    """``eval_loss`` (last) and ``best_eval_loss`` of a Trainer's log history."""
    evals = [r for r in history if "eval_loss" in r]
    if not evals:
        return {}
    return {"eval_loss": float(evals[-1]["eval_loss"]), "best_eval_loss": float(min(r["eval_loss"] for r in evals))}
