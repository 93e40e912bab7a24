"""``objective: grpo`` - group-relative policy optimisation on TRL's GRPOTrainer.

Each prompt is answered ``num_generations`` times; each completion's advantage is
its reward minus the group's mean (divided by the group's std with
``scale_rewards: group``), with a KL penalty ``kl_coef`` against the reference (the
adapter disabled). The rewards are reward-function plugins
(``objective.rewards``), summed with their weights.

Variants (TRL's names): ``loss_type`` says how the clipped per-token surrogate is
averaged - ``grpo`` (per sequence, then over sequences), ``bnpo`` (over the
tokens of the local batch), ``dr_grpo`` (Dr. GRPO: by ``batch x max_new_tokens``,
no length bias), ``dapo`` (DAPO, the default: over the tokens of the whole
accumulated batch); ``importance_sampling_level: sequence`` is GSPO (one ratio per
sequence, the geometric mean of its token ratios; use it with ``loss_type:
grpo`` as in the paper); ``epsilon_high`` is DAPO's clip-higher.

    objective:
      name: grpo
      num_generations: 4
      loss_type: grpo
      importance_sampling_level: sequence     # GSPO
      rewards: [{name: regex, pattern: '^\\{.*\\}$'}, {name: length, max: 64, weight: 0.5}]

:func:`run_trl_policy` is the part every TRL online trainer shares (the ``rloo``
objective runs through it too): prompts, reward plugins as TRL reward functions,
the trainer with tunesmith's pickle-free checkpoints and callbacks, the RL curves,
the final adapter without TRL's frozen 'ref' copy.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from tunesmith import hookimpl
from tunesmith.core.rewards import PolicyOptions

#: loss types whose aggregation sums token terms: with sequence-level ratios they
#: weight each sequence by its length (TRL warns; the GSPO paper uses ``grpo``)
TOKEN_SUM_LOSSES = ("dapo", "bnpo", "dr_grpo")


class GRPOOptions(PolicyOptions):
    batch_size: int = Field(16, ge=1, description="Completions generated per step (prompts x num_generations).")
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generation batch (mu).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="How the token losses are averaged: grpo (per sequence), bnpo (local tokens), "
        "dr_grpo (batch x max_new_tokens), dapo (tokens of the accumulated batch).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Policy ratio per token, or per sequence (GSPO: the mean token log-ratio).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by the reward std of the group/batch, or not.")
    cliprange: float = Field(0.2, gt=0, description="Clipping of the policy ratio (epsilon).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound (DAPO clip-higher, e.g. 0.28); None: cliprange.")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_new_tokens out of the loss (DAPO).")

    @model_validator(mode="after")
    def _check_clip(self) -> "GRPOOptions":
        if self.epsilon_high is not None and self.epsilon_high < self.cliprange:
            raise ValueError(f"epsilon_high ({self.epsilon_high:g}) must be at least cliprange ({self.cliprange:g})")
        return self


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


def run_trl_policy(
    session: Any,
    options: PolicyOptions,
    *,
    trainer_class: type,
    config_class: type,
    prompts_per_step: int,
    config: dict,
    policy_loss: Callable[[dict], None],
) -> dict:
    """Train a TRL online trainer (GRPOTrainer, RLOOTrainer, ...) inside ``session``.

    ``config`` holds the trainer-specific ``*Config`` fields; the shared ones (batch,
    sampling, schedule, precision, checkpoints, logging) are filled in here.
    ``policy_loss(logs)`` adds ``policy_loss`` to a logged row (see
    :func:`normalise_logs`). Returns the result fields (reward curve summary)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from tunesmith.core.rewards import RewardSet, curve_summary, load_prompts, max_steps, plot_rl
    from tunesmith.core.training import SafeCheckpoints, precision_flags

    cfg, run, ctx = session.cfg, session.run, session.context
    rows = load_prompts(cfg, options)
    rewards = RewardSet(cfg, options, session.registries, ctx)
    model, tok = session.prepare_model()
    model.config.use_cache = True
    lr = session.learning_rate(len(rows), override=options.learning_rate)
    session.say(f"learning_rate {lr:g}")
    steps = max_steps(cfg, len(rows), prompts_per_step)
    ds = Dataset.from_list([{"prompt": r["prompt"], "row_index": i} for i, r in enumerate(rows)])
    t = cfg.training
    warmup: float | int = t.warmup_steps if t.warmup_steps > 0 else float(t.warmup_ratio)
    args = config_class(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=1,
        max_completion_length=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        beta=options.kl_coef,
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
        # the session's resolved choice: where it stored the frozen base in bf16 (precision auto on a
        # bf16-capable CPU), the policy runs under bf16 autocast as SFT does, not bf16 weights without it
        **precision_flags(session.precision),
        **config,
    )

    class RLCurves(TrainerCallback):
        """Adds ``response_length``/``policy_loss`` to TRL's logs (before metrics.jsonl is written) and draws plots/rl.png."""

        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not logs or "reward" not in logs:
                return
            policy_loss(logs)
            self.rows.append({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})
            if session.is_main:
                plot_rl(self.rows, run.plots_dir / "rl.png")

    name = f"Tunesmith{trainer_class.__name__}"
    trainer_cls = type(name, (SafeCheckpoints, trainer_class), {})  # atomic, pickle-free checkpoints
    trainer = trainer_cls(
        model=model, reward_funcs=_reward_funcs(rewards, rows), args=args, train_dataset=ds,
        processing_class=tok, callbacks=[RLCurves(), *session.callbacks(has_eval=False)],
    )
    _out, runtime = session.fit(trainer)
    logged = [r for r in trainer.state.log_history if "reward" in r]
    for r in logged:
        policy_loss(r)
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


class GRPO:
    name = "grpo"
    description = "Group-relative policy optimisation (TRL's GRPOTrainer; loss types grpo/bnpo/dr_grpo/dapo, GSPO) against reward-function plugins"
    batch_kind = None
    Options = GRPOOptions

    def check(self, cfg: Any, options: GRPOOptions, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError
        from tunesmith.core.ranks import say

        if options.batch_size % options.num_generations:
            raise ConfigError(
                f"objective.batch_size ({options.batch_size}) must be a multiple of objective.num_generations "
                f"({options.num_generations})",
                key="objective.batch_size", source=cfg.source,
            )
        if options.importance_sampling_level == "sequence" and options.loss_type in TOKEN_SUM_LOSSES:
            say(f"note: importance_sampling_level: sequence with loss_type: {options.loss_type} weights each sequence "
                "by its length; GSPO as in the paper is loss_type: grpo")

    def train(self, session: Any, options: GRPOOptions) -> dict:
        from trl import GRPOConfig, GRPOTrainer

        beta = options.kl_coef
        return run_trl_policy(
            session, options, trainer_class=GRPOTrainer, config_class=GRPOConfig,
            prompts_per_step=options.batch_size // options.num_generations,
            config=dict(
                num_generations=options.num_generations,
                epsilon=options.cliprange,
                epsilon_high=options.epsilon_high,
                num_iterations=options.num_iterations,
                loss_type=options.loss_type,
                importance_sampling_level=options.importance_sampling_level,
                scale_rewards=options.scale_rewards,
                mask_truncated_completions=options.mask_truncated_completions,
            ),
            policy_loss=lambda logs: normalise_logs(logs, beta),
        )


@hookimpl
def register_objectives(register: Any) -> None:
    register(GRPO())
