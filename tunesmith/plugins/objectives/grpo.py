"""``objective: grpo`` - group-relative policy optimisation on TRL's GRPOTrainer.

Each prompt is answered ``num_generations`` times; each completion's advantage is
its reward minus the group's mean (divided by the group's std with
``scale_rewards: group``), with a KL penalty ``kl_coef`` against the reference (the
adapter disabled). The rewards are reward-function plugins
(``objective.rewards``), summed with their weights.

    objective:
      name: grpo
      num_generations: 4
      rewards: [{name: regex, pattern: '^\\{.*\\}$'}, {name: length, max: 64, weight: 0.5}]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunesmith import hookimpl
from tunesmith.core.rewards import PolicyOptions


class GRPOOptions(PolicyOptions):
    batch_size: int = Field(16, ge=1, description="Completions generated per step (prompts x num_generations).")
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generation batch (mu).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field("dapo", description="Loss normalisation (TRL's loss_type).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by the reward std of the group/batch, or not.")
    cliprange: float = Field(0.2, gt=0, description="Clipping of the policy ratio (epsilon).")


def _reward_funcs(rewards: Any, rows: list[dict]) -> list[Any]:
    """One TRL reward function per reward plugin (TRL weights and sums them)."""
    from tunesmith.core.rewards import prompt_text

    def text_of(x: Any) -> str:
        if isinstance(x, str):
            return x
        if isinstance(x, list) and x and isinstance(x[-1], dict):
            return str(x[-1].get("content", ""))
        return str(x)

    funcs = []
    for key, (name, plugin, opts, _weight) in zip(rewards.keys, rewards.items):
        def fn(prompts: list, completions: list, row_index: list | None = None, _p: Any = plugin, _o: Any = opts, **kw: Any) -> list[float]:
            rs = [rows[int(i)] for i in (row_index or [])] or [{} for _ in completions]
            ptexts = [prompt_text(r) if r else text_of(p) for r, p in zip(rs, prompts)]
            return [float(v) for v in _p.score(ptexts, [text_of(c) for c in completions], rs, _o, rewards.context)]

        fn.__name__ = key
        funcs.append(fn)
    return funcs


def normalise_logs(logs: dict, beta: float) -> None:
    """The per-step names every RL run logs. TRL logs ``policy_loss`` only with an
    entropy bonus; otherwise its ``loss`` is the token mean of ``-clipped surrogate +
    beta * KL``, so the policy term is ``loss - beta * kl``."""
    if "completions/mean_length" in logs:
        logs.setdefault("response_length", logs["completions/mean_length"])
    if "policy_loss" not in logs and isinstance(logs.get("loss"), (int, float)):
        logs["policy_loss"] = float(logs["loss"]) - beta * float(logs.get("kl") or 0.0)
    logs.setdefault("kl", 0.0)


def drop_ref_adapter(model: Any) -> None:
    """TRL adds a frozen copy of the adapter named 'ref'; the saved adapter is 'default' only."""
    import logging

    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict) and "ref" in cfgs and len(cfgs) > 1:
        try:
            model.delete_adapter("ref")
            model.set_adapter("default")
        except Exception as exc:  # noqa: BLE001 - saving still works with both present
            logging.getLogger("tunesmith.grpo").warning("could not drop TRL's reference adapter: %s", exc)


class GRPO:
    name = "grpo"
    description = "Group-relative policy optimisation (TRL's GRPOTrainer) against reward-function plugins"
    batch_kind = None
    Options = GRPOOptions

    def check(self, cfg: Any, options: GRPOOptions, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError

        if options.batch_size % options.num_generations:
            raise ConfigError(
                f"objective.batch_size ({options.batch_size}) must be a multiple of objective.num_generations "
                f"({options.num_generations})",
                key="objective.batch_size", source=cfg.source,
            )

    def train(self, session: Any, options: GRPOOptions) -> dict:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from tunesmith.core.rewards import RewardSet, curve_summary, load_prompts, max_steps, plot_rl
        from tunesmith.core.training import SafeCheckpoints, precision_flags

        cfg, run, ctx = session.cfg, session.run, session.context
        rows = load_prompts(cfg, options)
        rewards = RewardSet(cfg, options, session.registries, ctx)
        model, tok = session.prepare_model()
        model.config.use_cache = True
        lr = session.learning_rate(len(rows), override=options.learning_rate)
        session.say(f"learning_rate {lr:g}")
        steps = max_steps(cfg, len(rows), options.batch_size // options.num_generations)
        ds = Dataset.from_list([{"prompt": r["prompt"], "row_index": i} for i, r in enumerate(rows)])
        t = cfg.training
        warmup: float | int = t.warmup_steps if t.warmup_steps > 0 else float(t.warmup_ratio)
        args = GRPOConfig(
            output_dir=str(run.checkpoints_dir),
            per_device_train_batch_size=options.batch_size,
            gradient_accumulation_steps=1,
            num_generations=options.num_generations,
            max_completion_length=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            beta=options.kl_coef,
            epsilon=options.cliprange,
            num_iterations=options.num_iterations,
            loss_type=options.loss_type,
            scale_rewards=options.scale_rewards,
            reward_weights=[w for *_x, w in rewards.items],
            learning_rate=lr,
            max_steps=steps,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=warmup,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            gradient_checkpointing=t.gradient_checkpointing,
            logging_steps=1,
            save_strategy="steps" if t.save_steps > 0 else "no",
            save_steps=t.save_steps if t.save_steps > 0 else 500,
            save_total_limit=t.save_total_limit,
            seed=t.seed,
            data_seed=t.seed,
            report_to="none",
            disable_tqdm=True,
            log_completions=False,
            **precision_flags(t.precision),
        )
        beta = options.kl_coef

        class RLCurves(TrainerCallback):
            """Adds ``response_length`` to TRL's logs (before metrics.jsonl is written) and draws plots/rl.png."""

            def __init__(self) -> None:
                self.rows: list[dict] = []

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
                if not logs or "reward" not in logs:
                    return
                normalise_logs(logs, beta)
                self.rows.append({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})
                if session.is_main:
                    plot_rl(self.rows, run.plots_dir / "rl.png")

        trainer_cls = type("TunesmithGRPOTrainer", (SafeCheckpoints, GRPOTrainer), {})  # atomic, pickle-free checkpoints
        trainer = trainer_cls(
            model=model, reward_funcs=_reward_funcs(rewards, rows), args=args, train_dataset=ds,
            processing_class=tok, callbacks=[RLCurves(), *session.callbacks(has_eval=False)],
        )
        _out, runtime = session.fit(trainer)
        logged = [r for r in trainer.state.log_history if "reward" in r]
        for r in logged:
            normalise_logs(r, beta)
        curve = [{"step": r.get("step"), **r} for r in logged]
        if session.is_main:
            plot_rl(curve, run.plots_dir / "rl.png")
        fields: dict[str, Any] = {
            "steps": int(trainer.state.global_step),
            "runtime_s": round(runtime, 2),
            "learning_rate": lr,
            "prompts": len(rows),
            **curve_summary(curve),
        }
        policy = trainer.accelerator.unwrap_model(trainer.model)
        drop_ref_adapter(policy)
        session.save_final(policy, fields)
        return fields


@hookimpl
def register_objectives(register: Any) -> None:
    register(GRPO())
