"""``objective: rloo`` - REINFORCE leave-one-out on TRL's RLOOTrainer.

Each prompt is answered ``num_generations`` (k) times. A completion's reward is the
sum of the reward plugins (weighted) minus ``kl_coef`` times its summed per-token
log-ratio to the reference (the adapter disabled); its advantage is that reward
minus the mean reward of the other k-1 completions of the same prompt::

    A_i = R_i - 1/(k-1) * sum_{j != i} R_j

(Ahmadian et al. 2024). The policy loss is the sequence-level clipped surrogate
``-min(rho A, clip(rho, 1-eps, 1+eps_high) A)`` with ``rho`` the ratio of the whole
completion's probability, averaged over completions. No value model, no critic.

The reward plugins, prompts, checkpoints, curves and final adapter are the same as
for ``grpo`` (shared through :func:`tunesmith.plugins.objectives.grpo.run_trl_policy`).

    objective:
      name: rloo
      num_generations: 4
      rewards: [{name: regex, pattern: '^\\{.*\\}$'}]
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from tunesmith import hookimpl
from tunesmith.core.rewards import PolicyOptions


class RLOOOptions(PolicyOptions):
    batch_size: int = Field(16, ge=1, description="Completions generated per step (prompts x num_generations).")
    num_generations: int = Field(4, ge=2, description="Completions per prompt (k); each one's baseline is the mean of the other k-1.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generation batch.")
    cliprange: float = Field(0.2, gt=0, description="Clipping of the sequence probability ratio (epsilon).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound; None: cliprange.")
    normalize_advantages: bool = Field(False, description="Scale the advantages of each batch to mean 0, std 1.")
    reward_clip: tuple[float, float] | None = Field(None, description="Clip the summed reward to [min, max] before the baseline.")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_new_tokens out of the loss.")

    @model_validator(mode="after")
    def _check(self) -> "RLOOOptions":
        if self.epsilon_high is not None and self.epsilon_high < self.cliprange:
            raise ValueError(f"epsilon_high ({self.epsilon_high:g}) must be at least cliprange ({self.cliprange:g})")
        if self.reward_clip is not None and self.reward_clip[0] >= self.reward_clip[1]:
            raise ValueError(f"reward_clip must be [min, max] with min < max, got {list(self.reward_clip)}")
        return self


def rloo_logs(logs: dict) -> None:
    """The per-step names every RL run logs. RLOO's KL is in the reward, so TRL's
    ``loss`` is the policy term itself."""
    if "completions/mean_length" in logs:
        logs.setdefault("response_length", logs["completions/mean_length"])
    if "policy_loss" not in logs and isinstance(logs.get("loss"), (int, float)):
        logs["policy_loss"] = float(logs["loss"])
    logs.setdefault("kl", 0.0)


def leave_one_out_advantages(rewards: Any, k: int) -> Any:
    """``R_i - mean_{j != i} R_j`` within each group of ``k`` consecutive rewards (what
    RLOOTrainer computes; kept here to document and test the baseline)."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


class RLOO:
    name = "rloo"
    description = "REINFORCE leave-one-out (TRL's RLOOTrainer): k samples per prompt, each baselined by the other k-1"
    batch_kind = None
    Options = RLOOOptions

    def check(self, cfg: Any, options: RLOOOptions, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError

        if options.batch_size % options.num_generations:
            raise ConfigError(
                f"objective.batch_size ({options.batch_size}) must be a multiple of objective.num_generations "
                f"({options.num_generations})",
                key="objective.batch_size", source=cfg.source,
            )

    def train(self, session: Any, options: RLOOOptions) -> dict:
        from trl import RLOOConfig, RLOOTrainer

        from tunesmith.plugins.objectives.grpo import run_trl_policy

        return run_trl_policy(
            session, options, trainer_class=RLOOTrainer, config_class=RLOOConfig,
            prompts_per_step=options.batch_size // options.num_generations,
            config=dict(
                num_generations=options.num_generations,
                num_iterations=options.num_iterations,
                epsilon=options.cliprange,
                epsilon_high=options.epsilon_high,
                normalize_advantages=options.normalize_advantages,
                reward_clip_range=tuple(options.reward_clip) if options.reward_clip else None,
                mask_truncated_completions=options.mask_truncated_completions,
            ),
            policy_loss=rloo_logs,
        )


@hookimpl
def register_objectives(register: Any) -> None:
    register(RLOO())
