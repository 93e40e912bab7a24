"""Shared machinery of the policy-optimisation objectives (grpo, ppo, rloo, ...).

* :class:`PolicyOptions` - the options every RL objective shares (rewards,
  sampling, KL coefficient); an objective's ``Options`` subclasses it;
* :func:`load_prompts` - prompt rows from ``data:`` (``prompt`` as text or messages,
  chat records whose last assistant turn becomes ``answer``, alpaca, pairs);
* :class:`RewardSet` - the configured reward plugins with weights:
  ``score(prompts, completions, rows) -> (total, per_reward)``;
* :func:`plot_rl` - the four-panel PNG (mean reward, KL, policy loss, response
  length) and :func:`curve_summary` - the reward curve's start and end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.core.config import RewardSpec
from tunesmith.core.errors import ConfigError, DataError, TunesmithError
from tunesmith.core.io import atomic_open

#: the per-step values every RL run logs (metrics.jsonl keys)
CURVES = (("reward", "mean reward"), ("kl", "KL to reference"), ("policy_loss", "policy loss"), ("response_length", "response length (tokens)"))


class PolicyOptions(BaseModel):
    """Options every policy-optimisation objective shares. Steps, schedule, weight
    decay, gradient clipping, precision and seed come from ``training:``; the
    prompts from ``data:``."""

    model_config = ConfigDict(extra="forbid")

    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward plugins with weights; their scores are summed.")
    reward_model: str | None = Field(None, description="Shortcut for a reward_model reward with this path (weight 1).")
    system_prompt: str | None = Field(None, description="System message put before every prompt that has none.")
    learning_rate: float | None = Field(None, gt=0, description="None: training.learning_rate (auto: 1e-5 full, 2e-4 LoRA).")
    batch_size: int = Field(16, ge=1, description="Completions generated per step.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty against the reference (the adapter disabled, or a frozen copy).")


# --------------------------------------------------------------------------- prompts
def _prompt_row(row: dict, loc: dict, system_prompt: str | None) -> dict:
    """One prompt row: ``{"prompt": [messages], "answer": str|None, ...other columns}``."""
    row = dict(row)
    answer = row.pop("answer", None)
    if "prompt" in row:
        p = row.pop("prompt")
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
    elif "messages" in row:
        msgs = list(row.pop("messages"))
        if msgs and msgs[-1].get("role") == "assistant":
            last = msgs.pop()
            if answer is None:
                answer = last.get("content")
    elif "instruction" in row:
        text = str(row.pop("instruction"))
        extra = row.pop("input", None)
        if extra:
            text += "\n\n" + str(extra)
        out = row.pop("output", None)
        answer = answer if answer is not None else out
        msgs = [{"role": "user", "content": text}]
    else:
        raise DataError(
            "a prompt row needs 'prompt' (text or messages), 'messages' or 'instruction'",
            path=loc.get("source"), line=loc.get("line"),
        )
    row.pop("chosen", None)
    row.pop("rejected", None)
    if not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise DataError("the prompt must be text or a non-empty list of {role, content} messages", path=loc.get("source"), line=loc.get("line"))
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    if answer is not None and not isinstance(answer, (str, list)):
        answer = str(answer)
    meta = dict(row.pop("metadata", None) or {})
    return {"prompt": msgs, "answer": answer, **row, "metadata": meta, "_source": loc.get("source"), "_row": loc.get("line") or loc.get("row")}


def load_prompts(cfg: Any, options: Any = None) -> list[dict]:
    """Prompt rows of ``data.path`` (or every ``data.sources`` path); ``options.system_prompt``
    (a :class:`PolicyOptions`) goes before prompts that have no system turn."""
    from tunesmith.core.data import iter_raw_rows

    paths = []
    if cfg.data.sources:
        paths = [cfg.resolve_path(s.path) for s in cfg.data.sources]
    elif cfg.data.path:
        paths = [cfg.resolve_path(cfg.data.path)]
    if not paths:
        raise ConfigError("RL needs prompts: set data.path to a JSONL of prompts", key="data.path", source=cfg.source)
    rows: list[dict] = []
    for path in paths:
        if not Path(path).exists():
            raise DataError("prompt file not found", path=str(path))
        for rr in iter_raw_rows(path):
            if rr.error is not None:
                if cfg.data.skip_invalid:
                    continue
                raise DataError(rr.error, path=rr.loc.get("source"), line=rr.loc.get("line"))
            if not isinstance(rr.row, dict):
                raise DataError("expected a JSON object", path=rr.loc.get("source"), line=rr.loc.get("line"))
            try:
                rows.append(_prompt_row(rr.row, rr.loc, getattr(options, "system_prompt", None)))
            except DataError:
                if not cfg.data.skip_invalid:
                    raise
    if not rows:
        raise DataError("no prompts", path=str(paths[0]))
    return rows


def prompt_text(row: dict) -> str:
    """The text of the last user turn (what ``prompts`` holds for reward plugins)."""
    for m in reversed(row["prompt"]):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(row["prompt"][-1].get("content", ""))


# --------------------------------------------------------------------------- rewards
class RewardSet:
    """The configured rewards: ``total = sum(weight_i * score_i)``."""

    def __init__(self, cfg: Any, options: Any, registries: Any, context: Any) -> None:
        self.context = context
        self.items: list[tuple[str, Any, Any, float]] = []
        for i, spec in enumerate(options.rewards):
            plugin = registries.reward_functions.get(spec.name)
            opts = spec._options
            if opts is None and getattr(plugin, "Options", None) is not None:
                opts = _validate_options(plugin, spec.plugin_fields(), f"objective.rewards.{i}", cfg)
            self.items.append((spec.name, plugin, opts, float(spec.weight)))
        if options.reward_model:
            plugin = registries.reward_functions.get("reward_model")
            opts = _validate_options(plugin, {"path": options.reward_model}, "objective.reward_model", cfg)
            self.items.append(("reward_model", plugin, opts, 1.0))
        if not self.items:
            raise ConfigError(
                "no reward: list reward plugins under objective.rewards (e.g. [{name: regex, pattern: ...}]) "
                "or set objective.reward_model",
                key="objective.rewards", source=cfg.source,
            )
        names = [n for n, *_ in self.items]
        self.keys = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def score(self, prompts: list[str], completions: list[str], rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        total = [0.0] * len(completions)
        per: dict[str, list[float]] = {}
        for key, (name, plugin, opts, weight) in zip(self.keys, self.items):
            vals = [float(v) for v in plugin.score(prompts, completions, rows, opts, self.context)]
            if len(vals) != len(completions):
                raise TunesmithError(f"the reward '{name}' returned {len(vals)} scores for {len(completions)} completions")
            per[key] = vals
            total = [t + weight * v for t, v in zip(total, vals)]
        return total, per


def _validate_options(plugin: Any, fields: dict, key: str, cfg: Any) -> Any:
    from pydantic import ValidationError

    try:
        return plugin.Options.model_validate(fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, e['loc']))}: {e['msg']}", key=key, source=cfg.source) from None


# --------------------------------------------------------------------------- steps and curves
def max_steps(cfg: Any, n_prompts: int, prompts_per_step: int) -> int:
    if cfg.training.max_steps and cfg.training.max_steps > 0:
        return int(cfg.training.max_steps)
    return max(1, math.ceil(cfg.training.epochs * n_prompts / max(1, prompts_per_step)))



def plot_rl(rows: list[dict], path: Path) -> Path | None:
    """Mean reward, KL, policy loss and response length against the step (PNG, atomic)."""
    if not any("reward" in r for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    for ax, (key, label) in zip(axes.flat, CURVES):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


def curve_summary(rows: list[dict]) -> dict:
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
    if not rewards:
        return {}
    k = max(1, min(3, len(rewards) // 3))
    return {
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_start": sum(rewards[:k]) / k,  # mean of the first k steps: one step is noisy
        "reward_end": sum(rewards[-k:]) / k,
        "reward_window": k,
    }
