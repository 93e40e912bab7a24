"""The training session: what every objective shares.

``train(cfg)`` looks the objective up in the objectives registry, opens a
:class:`TrainingSession` and hands it to ``objective.train(session, options)``.
The session owns

* the run directory (``run_dir=`` or ``output_dir``), the resolved config in it,
  and rank-0-only writes (``session.is_main``);
* resume: the last *complete* checkpoint with ``resume=True``; otherwise an
  earlier run's checkpoints and metrics are removed (by rank 0);
* the seed (``training.seed``), set right before the objective starts;
* the config checks that need no model: the objective's own ``check`` and the
  losses against the objective's ``batch_kind``;
* model preparation (base model, chat template, PEFT method), the learning-rate
  rule, training arguments and the standard callbacks;
* :meth:`fit` - the lifecycle events around any Trainer's ``train()``
  (``before_train``, ``on_train_error``);
* :meth:`save_final` - ``RUN/final/`` (rank 0) with ``tunesmith.json``;
* :meth:`finish` - the result dict, ``train_result.json``, the per-rank report
  under ``torchrun``, ``after_train`` and one summary line.

An objective plugin owns only what makes it different: its data, its batches,
its trainer or loop.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.core.context import RunContext
from tunesmith.core.errors import ConfigError
from tunesmith.core.ranks import rank, say, world_size
from tunesmith.core.registry import member
from tunesmith.core.rundir import RunDir

log = logging.getLogger("tunesmith.session")


def resolve_registries(cfg: Any, registries: Any = None) -> Any:
    """The registries a config runs with (its ``plugins.disable`` and ``strict`` honoured)."""
    from tunesmith.core.plugins import registries_for

    return registries_for(cfg, registries)


def section_options(plugin: Any, section: Any) -> Any:
    """A plugin section's validated options (validated now when the config was built
    without plugin checks); None for a plugin that takes no options."""
    opts = section._options
    if opts is None and getattr(plugin, "Options", None) is not None:
        opts = plugin.Options.model_validate(section.plugin_fields())
    return opts


def objective_of(cfg: Any, registries: Any) -> tuple[Any, Any]:
    """(objective plugin, its validated options)."""
    objective = registries.objectives.get(cfg.objective.name)
    return objective, section_options(objective, cfg.objective)


def resolve_losses(cfg: Any, registries: Any, objective: Any | None = None) -> list[tuple[str, Any, Any, float]]:
    """``[(name, loss plugin, options, weight)]`` for the run, checked against the
    objective's batch kind before anything heavy is loaded.

    A loss whose ``requires`` differs from the objective's ``batch_kind`` is a
    ConfigError naming ``losses.N.name``; so is a list in which no loss reads the
    objective's batches (only regularisers). With no ``losses:`` the objective's
    ``default_losses`` are used.
    """
    if objective is None:
        objective = objective_of(cfg, registries)[0]
    kind = member(objective, "objectives", "batch_kind")
    name = objective.name
    specs = list(cfg.losses or [])
    out: list[tuple[str, Any, Any, float]] = []
    if not specs:
        for loss_name in member(objective, "objectives", "default_losses"):
            plugin = registries.losses.get(loss_name)
            opts_model = getattr(plugin, "Options", None)
            out.append((loss_name, plugin, opts_model() if opts_model is not None else None, 1.0))
        return out
    if kind is None:
        raise ConfigError(f"objective '{name}' uses no loss plugins; remove losses:", key="losses", source=cfg.source)
    for i, spec in enumerate(specs):
        plugin = registries.losses.get(spec.plugin_name)
        needs = member(plugin, "losses", "requires")
        if needs is not None and needs != kind:
            raise ConfigError(
                f"the loss '{spec.plugin_name}' needs {_kind_text(needs)}, but objective '{name}' gives {_kind_text(kind)}"
                + _kind_hint(needs, registries),
                key=f"losses.{i}.name", source=cfg.source,
            )
        out.append((spec.plugin_name, plugin, section_options(plugin, spec), float(spec.weight)))
    if kind != "tokens" and not any(member(p, "losses", "requires") == kind for _, p, _, _ in out):
        default = ", ".join(member(objective, "objectives", "default_losses")) or "a loss for it"
        raise ConfigError(
            f"objective '{name}' needs a loss that reads {_kind_text(kind)} (add {{name: {default}}} to losses)",
            key="losses", source=cfg.source,
        )
    return out


def _kind_text(kind: str | None) -> str:
    return {"pairs": "chosen/rejected pairs", "tokens": "token sequences"}.get(str(kind), f"'{kind}' batches")


def _kind_hint(needs: str, registries: Any) -> str:
    """Which objectives give the batches a loss needs."""
    names = [n for n, o in registries.objectives.items() if member(o, "objectives", "batch_kind") == needs]
    if not names:
        return ""
    return f" (objectives that give them: {', '.join(names)})"


def auto_learning_rate(method: Any, n_params: int, n_examples: int, *, registries: Any = None) -> tuple[float, str]:
    """The usual rule: the PEFT method's ``default_learning_rate`` (full 1e-5,
    LoRA/QLoRA/DoRA 2e-4, other methods 1e-4); x0.5 above 30B parameters, x0.7
    above 10B; x1.2 above 100k examples, x0.8 below 1k.

    ``method`` is a PEFT method object or its name (looked up in ``registries``).
    """
    if isinstance(method, str):
        from tunesmith.core.plugins import registries_for

        method = registries_for(None, registries).peft_methods.get(method)
    base = float(member(method, "peft_methods", "default_learning_rate"))
    parts = [f"{base:g} ({method.name})"]
    lr = base
    if n_params > 30e9:
        lr *= 0.5
        parts.append("x0.5 (> 30B parameters)")
    elif n_params > 10e9:
        lr *= 0.7
        parts.append("x0.7 (> 10B parameters)")
    if n_examples > 100_000:
        lr *= 1.2
        parts.append("x1.2 (> 100k examples)")
    elif n_examples < 1000:
        lr *= 0.8
        parts.append("x0.8 (< 1k examples)")
    return lr, " ".join(parts) + f" = {lr:.3g}"


class TrainingSession:
    """One training run of one objective (see the module docstring)."""

    def __init__(self, cfg: Any, registries: Any = None, *, resume: bool = False, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.registries = resolve_registries(cfg, registries)
        self.objective, self.options = objective_of(cfg, self.registries)
        self.run = RunDir(Path(run_dir)) if run_dir else RunDir.for_config(cfg)
        self.resume = resume
        self.rank = rank()
        self.world_size = world_size()
        self.is_main = self.rank == 0
        self.checkpoint: Path | None = None
        self.context: RunContext | None = None
        self.losses: list[tuple[str, Any, Any, float]] = []
        self.method: Any = None
        self.method_options: Any = None
        self.base_dir: Path | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.chat_template: dict = {}
        #: the precision prepare_model resolved (what the base was loaded in); objectives
        #: that build their own TrainingArguments take their precision flags from it
        self.precision: Any = None
        self.loggers: Any = None
        self.t0 = time.time()

    @property
    def name(self) -> str:
        return self.objective.name

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ start
    def check(self) -> None:
        """Config checks that need no model: the objective's own, then the losses."""
        check = member(self.objective, "objectives", "check")
        if check is not None:
            check(self.cfg, self.options, self.registries)
        self.losses = resolve_losses(self.cfg, self.registries, self.objective)

    def start(self) -> RunContext:
        """Checks, run directory, resume point, seed; returns the run's context."""
        from transformers import set_seed

        from tunesmith.core.launch import check_launch
        from tunesmith.core.training import CHECKPOINT_RE, last_checkpoint

        check_launch(self.cfg, self.run.root)  # several processes must really be one process group
        self.check()
        run = self.run
        if self.resume:
            self.checkpoint = last_checkpoint(run.root)
            self.say(f"resuming from {self.checkpoint}" if self.checkpoint else
                     f"--resume: no complete checkpoint in {run.checkpoints_dir}; starting from the beginning")
        elif run.checkpoints_dir.exists() and any(CHECKPOINT_RE.match(p.name) for p in run.checkpoints_dir.iterdir()):
            self.say(f"note: {run.checkpoints_dir} has checkpoints of an earlier run; they are replaced (use --resume to continue)")
            if self.is_main:
                shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        if self.is_main:
            if self.checkpoint is None and run.metrics_path.exists():
                run.metrics_path.unlink()
            run.ensure()
            run.write_config(self.cfg)
        set_seed(self.cfg.training.seed)
        ctx = RunContext(config=self.cfg, run_dir=run.root, registries=self.registries)
        ctx.state["resume"] = self.checkpoint is not None
        ctx.state["objective"] = self.name
        ctx.state["session"] = self
        self.context = ctx
        from tunesmith.core.tracking import open_loggers

        self.loggers = open_loggers(self.cfg, self.registries, ctx)  # training.report_to, rank 0
        return ctx

    def log_row(self, row: dict) -> None:
        """One logged row (train or eval values, an RL step), rank 0: to the loggers
        (metrics.jsonl, TensorBoard, MLflow, ...) and the ``after_log`` hooks."""
        if not self.is_main:
            return
        step = int(row.get("step") or 0)
        if self.loggers is not None:
            self.loggers.log_metrics({k: v for k, v in row.items() if k not in ("step", "time_s")}, step)
        self.context.emit("after_log", step=step, logs=dict(row))

    # ------------------------------------------------------------------ model
    def prepare_model(self, *, head: str = "causal_lm") -> tuple[Any, Any]:
        """Load the base model (``head``: ``causal_lm`` or ``sequence_classification``
        with one output), fit the chat template, apply the PEFT method and print the
        trainable share. Sets ``model``, ``tokenizer``, ``method``, ``method_options``
        and ``base_dir``; returns ``(model, tokenizer)``."""
        from tunesmith.core.models import describe_trainable, load_from_dir, pick_dtype, resolve_model_dir
        from tunesmith.core.templates import apply_chat_template

        cfg, ctx = self.cfg, self.context
        method = self.registries.peft_methods.get(cfg.peft.method)
        options = section_options(method, cfg.peft)
        base_dir = resolve_model_dir(cfg, self.registries)
        quantization_config = member(method, "peft_methods", "quantization_config")
        quant = quantization_config(options) if quantization_config is not None else None
        from tunesmith.core.precision import cast_trainable_fp32, env_flag, resolve_precision

        precision = resolve_precision(cfg, self.registries, model_dir=base_dir)
        dtype = cfg.model.dtype
        if dtype == "auto" and precision.compute == "fp32":
            dtype = "float32"
        elif dtype == "auto" and precision.store_base_bf16:
            dtype = "bfloat16"  # the frozen base stored in bf16; trainable parameters fp32 (below)
        if head == "sequence_classification":
            model, tok = self._load_classifier(base_dir, pick_dtype(dtype), quant)
        else:
            model, tok = load_from_dir(
                base_dir, dtype=pick_dtype(dtype), attn_implementation=cfg.model.attn_implementation, quantization=quant,
            )
        model.config.use_cache = False
        if ctx is not None:
            ctx.model, ctx.tokenizer = model, tok
            ctx.state["base_params"] = sum(p.numel() for p in model.parameters())
        self.chat_template = apply_chat_template(cfg, tok, model, self.registries) or {}
        if head == "sequence_classification":
            model = self._apply_for_classification(method, model, options)
        else:
            model = method.apply(model, options, ctx)
        if precision.store_base_bf16:
            cast_trainable_fp32(model)
            if precision.device == "cpu" and env_flag("TUNESMITH_CPU_OPS") is not False:
                from tunesmith.core.cpu_ops import use_cpu_training_ops

                use_cpu_training_ops(model)  # one-node RMSNorm and SwiGLU for the eager bf16 step
        if ctx is not None:
            ctx.model = model
        self.say(describe_trainable(model, method))
        self.method, self.method_options, self.base_dir = method, options, base_dir
        self.precision = precision
        self.model, self.tokenizer = model, tok
        return model, tok

    @staticmethod
    def _load_classifier(base_dir: Path, dtype: Any, quant: Any) -> tuple[Any, Any]:
        """The base model with a one-output sequence-classification head (reward models)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tunesmith.core.models import setup_tokenizer

        tok = setup_tokenizer(AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False))
        kwargs: dict[str, Any] = {"dtype": dtype, "num_labels": 1, "trust_remote_code": False}
        if quant is not None:
            kwargs["quantization_config"] = quant
        model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), **kwargs)
        model.config.pad_token_id = tok.pad_token_id
        return model, tok

    def _apply_for_classification(self, method: Any, model: Any, options: Any) -> Any:
        """PEFT-library methods get ``task_type=SEQ_CLS`` so the new ``score`` head is
        trained and saved with the adapter (``modules_to_save``); others train it."""
        peft_config = member(method, "peft_methods", "peft_config")
        if peft_config is None:
            model = method.apply(model, options, self.context)
            head = getattr(model, "score", None)
            if head is not None:
                head.requires_grad_(True)
            return model
        from peft import get_peft_model

        prepare = member(method, "peft_methods", "prepare")
        model = prepare(model, options, self.context) if prepare is not None else model
        pcfg = peft_config(model, options, self.context)
        pcfg.task_type = "SEQ_CLS"
        if getattr(pcfg, "modules_to_save", None) is None:
            pcfg.modules_to_save = ["score"]
        elif "score" not in pcfg.modules_to_save:
            pcfg.modules_to_save = list(pcfg.modules_to_save) + ["score"]
        return get_peft_model(model, pcfg)

    # ------------------------------------------------------------------ data and settings
    def records(self) -> tuple[list[dict], list[dict], str]:
        """(train records, eval records, where they came from): the run's prepared
        split when there is one, else ``data.path`` / ``data.sources``."""
        from tunesmith.core.training import training_records

        return training_records(self.cfg, self.registries, self.run)

    def learning_rate(self, n_examples: int, *, override: float | None = None) -> float:
        """``override``, else ``training.learning_rate``, else the auto rule times the
        objective's ``learning_rate_scale`` (printed)."""
        if override is not None:
            return float(override)
        lr = self.cfg.training.learning_rate
        if lr != "auto":
            return float(lr)
        base_params = self.context.state.get("base_params", 0) if self.context else 0
        lr, why = auto_learning_rate(self.method or self.cfg.peft.method, base_params, n_examples, registries=self.registries)
        scale = float(member(self.objective, "objectives", "learning_rate_scale"))
        if scale != 1.0:
            lr, why = lr * scale, why + f" x{scale:g} ({self.name}) = {lr * scale:.3g}"
        self.say(f"learning_rate auto: {why}")
        return float(lr)

    def training_arguments(self, *, has_eval: bool, learning_rate: float, **overrides: Any) -> Any:
        """``TrainingArguments`` from ``training:`` (checkpoints under RUN/checkpoints)."""
        from tunesmith.core.training import build_training_arguments

        return build_training_arguments(self.cfg, self.run, has_eval=has_eval, learning_rate=learning_rate, **overrides)

    def callbacks(self, *, has_eval: bool) -> list[Any]:
        """metrics.jsonl + TensorBoard, loss plot, progress bar, lifecycle hooks, early stopping."""
        from tunesmith.core.training import standard_callbacks

        return standard_callbacks(self.cfg, self.run, self.context, has_eval=has_eval)

    # ------------------------------------------------------------------ training
    def fit(self, trainer: Any) -> tuple[Any, float]:
        """Run any transformers/TRL Trainer between the lifecycle events, resuming from
        the session's checkpoint; returns ``(train output, runtime_s)``."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress bar
        self.context.state["trainer"] = trainer
        self.context.emit("before_train")
        t0 = time.time()
        try:
            out = trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        except BaseException as exc:
            self.fail(exc)
            raise
        return out, time.time() - t0

    def fail(self, error: BaseException) -> None:
        """Report a failure to the ``on_train_error`` hooks and the loggers (once per run)."""
        if self.context is not None and not self.context.state.get("error_reported"):
            self.context.state["error_reported"] = True
            self.context.emit("on_train_error", error=error)
            if self.loggers is not None:
                self.loggers.close("failed", None)

    def run_trainer(self, *, args: Any, train_ds: Any, eval_ds: Any, collator: Any,
                    losses: list[tuple[str, Any, Any, float]] | None = None) -> tuple[Any, Any, float]:
        """tunesmith's Trainer (the weighted loss plugins, atomic checkpoints) with the
        standard callbacks and the PEFT method's own; losses are set up, then
        :meth:`fit`. Returns ``(trainer, train output, runtime_s)``."""
        from tunesmith.core.training import TunesmithTrainer

        losses = self.losses if losses is None else losses
        trainer = TunesmithTrainer(
            model=self.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
            processing_class=self.tokenizer, losses=losses, run=self.context,
            batch_kind=member(self.objective, "objectives", "batch_kind") or "tokens",
            callbacks=self.callbacks(has_eval=eval_ds is not None),
        )
        method_callbacks = member(self.method, "peft_methods", "callbacks")
        for cb in (method_callbacks(self.method_options, self.context) if method_callbacks is not None else []):
            trainer.add_callback(cb)
        for _name, plugin, options, _w in losses:
            setup = member(plugin, "losses", "setup")
            if setup is not None:
                setup(self.model, options, self.context)
        out, runtime = self.fit(trainer)
        return trainer, out, runtime

    # ------------------------------------------------------------------ the end
    def final_info(self, model: Any, result: dict, **extra: Any) -> dict:
        """What ``final/tunesmith.json`` records (read by load_trained and the exporters)."""
        from tunesmith.core.training import model_info

        cfg, method, opts = self.cfg, self.method, self.method_options
        info = {
            "base_model_dir": str(self.base_dir),
            "model": model_info(cfg, self.registries),
            "peft": {"method": method.name, "options": opts.model_dump(mode="json") if opts is not None else {},
                     "mergeable": bool(member(method, "peft_methods", "mergeable"))},
            "objective": self.name,
            **extra,
            "max_length": cfg.training.max_length,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "steps": result.get("steps"),
            "config_hash": cfg.hash(),
        }
        if self.chat_template:
            info["template"] = self.chat_template
        for key in ("train_loss", "reward_start", "reward_end"):
            if key in result:
                info[key] = result[key]
        return info

    def save_final(self, model: Any, result: dict, **extra: Any) -> Path:
        """Write ``RUN/final/`` (rank 0): the adapter or model through the PEFT
        method's ``save``, the tokenizer and ``tunesmith.json``."""
        from tunesmith.core.training import save_final

        if self.is_main:
            save_final(model, self.tokenizer, self.method, self.run, self.final_info(model, result, **extra))
        return self.run.final_dir

    def finish(self, fields: dict) -> dict:
        """The result: the objective's fields plus the session's; written (rank 0) to
        ``train_result.json``; ``after_train`` is called and one line printed."""
        from tunesmith.core.io import atomic_write_json

        result: dict[str, Any] = {
            "run_dir": str(self.run.root),
            "output_path": str(self.run.final_dir),
            "objective": self.name,
            **fields,
            "resumed_from": str(self.checkpoint) if self.checkpoint else None,
            "stop_reason": self.context.stop_reason if self.context else None,
        }
        if self.world_size > 1:  # each rank reports what it trained (diagnostics, tests)
            atomic_write_json(self.run.root / "ranks" / f"rank-{self.rank}.json",
                              {"rank": self.rank, "world_size": self.world_size, "steps": result.get("steps"),
                               "tokens": result.get("tokens")})
        if self.is_main:
            atomic_write_json(self.run.root / "train_result.json", result)
        self.context.emit("after_train", result=result)
        if self.loggers is not None:
            for png in sorted(self.run.plots_dir.glob("*.png")) if self.run.plots_dir.exists() else []:
                self.loggers.log_artifact(png, "plot")
            full = self.method is not None and member(self.method, "peft_methods", "saves_full_model")
            self.loggers.log_artifact(self.run.final_dir, "model" if full else "adapter")
            self.loggers.close("finished", result)
        self.say(self.summary(result))
        return result

    def summary(self, result: dict) -> str:
        runtime = result.get("runtime_s", time.time() - self.t0)
        what = f"trained {result.get('steps')} steps ({self.name}) in {runtime:.0f}s"
        if isinstance(result.get("train_loss"), float):
            what += f"; loss {result['train_loss']:.4f}"
        if "reward_start" in result:
            what += f"; mean reward {result['reward_start']:.3f} -> {result['reward_end']:.3f}"
        return what + f"; saved {self.run.final_dir}"


def train(cfg: Any, registries: Any = None, *, resume: bool = False, run_dir: str | Path | None = None) -> dict:
    """Train as ``cfg`` says (any objective); returns the result (also passed to ``after_train``)."""
    from tunesmith.core.plugins import activate

    registries = resolve_registries(cfg, registries)
    # training.distributed (torchrun, Ray): the launch_training hook starts the processes
    launched = registries.hook.launch_training(cfg=cfg, registries=registries, resume=resume, run_dir=run_dir) \
        if registries.hook is not None else None
    if launched is not None:
        return launched
    session = TrainingSession(cfg, registries, resume=resume, run_dir=run_dir)
    with activate(session.registries):  # helpers that look plugins up keep plugins.disable
        session.start()
        try:
            fields = session.objective.train(session, session.options)
        except BaseException as exc:
            session.fail(exc)
            raise
        return session.finish(fields or {})
