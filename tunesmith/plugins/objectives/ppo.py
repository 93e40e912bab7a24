"""``objective: ppo`` - classic RLHF PPO against reward-function plugins.

Why the loop is tunesmith's own: TRL 1.16 ships no PPO trainer at all
(``PPOTrainer`` left the main package and is not under ``trl.experimental``
either; RLOO and GRPO are what TRL maintains). This is the classic RLHF PPO
(Ziegler et al. 2019, as TRL's former ``PPOTrainer``): a scalar value head on the
policy's last hidden state, a per-token KL penalty against the reference (the same
model with the adapter disabled, so no second copy is loaded), the sequence reward
on the last token, GAE, clipped policy and value losses, and an adaptive KL
coefficient. Checkpoints are atomic safetensors (adapter, value head, optimiser)
and resume.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesmith import hookimpl
from tunesmith.core import state_io
from tunesmith.core.errors import TunesmithError
from tunesmith.core.io import atomic_dir, atomic_write_json
from tunesmith.core.rewards import PolicyOptions

log = logging.getLogger("tunesmith.ppo")


class PPOOptions(PolicyOptions):
    mini_batch_size: int = Field(4, ge=1, description="Completions per optimiser update.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each batch of rollouts.")
    target_kl: float | None = Field(0.1, gt=0, description="Adapt the KL coefficient towards this KL per completion (None: fixed).")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive KL controller (Ziegler et al.).")
    cliprange: float = Field(0.2, gt=0, description="Clipping of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clipping of the value update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages per batch.")


# --------------------------------------------------------------------------- pieces
class AdaptiveKL:
    """Ziegler et al. (2019): ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + err * n_steps / self.horizon


def _masked_mean(x: Any, mask: Any, dim: int | None = None) -> Any:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _whiten(x: Any, mask: Any) -> Any:
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    return (x - mean) * (var + 1e-8).rsqrt() * mask


def gae(rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Generalised advantage estimation over completion tokens; (advantages, returns)."""
    import torch

    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def _token_logprobs(logits: Any, tokens: Any, temperature: float) -> Any:
    import torch

    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def _forward(model: Any, value_head: Any, seq: Any, attn: Any, n_prompt: int, temperature: float, *, values: bool = True) -> tuple[Any, Any]:
    """Log-probs of the completion tokens and the value estimate before each of them."""
    out = model(input_ids=seq, attention_mask=attn, output_hidden_states=values, use_cache=False)
    logits = out.logits[:, n_prompt - 1 : -1]
    lp = _token_logprobs(logits, seq[:, n_prompt:], temperature)
    v = None
    if values:
        h = out.hidden_states[-1][:, n_prompt - 1 : -1]
        v = value_head(h.to(value_head.weight.dtype)).squeeze(-1)
    return lp, v


def _save_ppo_checkpoint(folder: Path, model: Any, method: Any, value_head: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Adapter + value head + optimiser moments (safetensors) + state JSON, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(folder, overwrite=True) as tmp:
        method.save(model, tmp)
        save_file({k: v.detach().contiguous() for k, v in value_head.state_dict().items()}, str(tmp / "value_head.safetensors"))
        state_io.save_optimizer(optimizer, tmp)
        state_io.save_state_dict_json(scheduler, tmp / state_io.SCHEDULER_FILE)
        atomic_write_json(tmp / "trainer_state.json", state)


def _load_ppo_checkpoint(folder: Path, model: Any, value_head: Any, optimizer: Any, scheduler: Any) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        set_peft_model_state_dict(model, load_file(str(adapter)))
    elif (folder / "model.safetensors").exists():
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    value_head.load_state_dict(load_file(str(folder / "value_head.safetensors")))
    state_io.load_optimizer(optimizer, folder)
    state_io.load_state_dict_json(scheduler, folder / state_io.SCHEDULER_FILE)
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))


def train_ppo(session: Any, rl: "PPOOptions") -> dict:
    """Classic RLHF PPO against reward plugins (a reward model, rules) with a KL penalty."""
    import torch
    from transformers import get_scheduler

    from tunesmith.core.render import render_prompt
    from tunesmith.core.rewards import RewardSet, curve_summary, load_prompts, max_steps as _max_steps, plot_rl, prompt_text
    from tunesmith.core.training import rotate_checkpoints

    cfg, t, run, context = session.cfg, session.cfg.training, session.run, session.context
    checkpoint = session.checkpoint
    rows = load_prompts(cfg, rl)
    rewards = RewardSet(cfg, rl, session.registries, context)
    model, tok = session.prepare_model()
    method = session.method
    is_peft = hasattr(model, "disable_adapter")
    ref_model = None
    if not is_peft:
        # full fine-tuning: the reference is a frozen copy (there is no adapter to switch off)
        import copy

        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    for m in model.modules():  # the ratio must compare like with like: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    device = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    value_head = torch.nn.Linear(hidden, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    lr = session.learning_rate(len(rows), override=rl.learning_rate)
    session.say(f"learning_rate {lr:g}; PPO is tunesmith's own loop (TRL 1.16 has no PPO trainer)")
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    max_steps = _max_steps(cfg, len(rows), rl.batch_size)
    updates_per_step = rl.ppo_epochs * (rl.batch_size // rl.mini_batch_size)
    total_updates = max_steps * updates_per_step
    warmup = t.warmup_steps * updates_per_step if t.warmup_steps > 0 else int(t.warmup_ratio * total_updates)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates)
    kl_ctl = AdaptiveKL(rl.kl_coef, rl.target_kl, rl.kl_horizon)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else None

    rng = random.Random(t.seed)
    order: list[int] = []
    metrics: list[dict] = []
    start = 0
    if checkpoint is not None:
        st = _load_ppo_checkpoint(checkpoint, model, value_head, optimizer, scheduler)
        start, kl_ctl.value = int(st["step"]), float(st["kl_coef"])
        rng.setstate(_tuple_state(st["rng"]))
        order = list(st.get("order", []))
        if run.metrics_path.exists():
            metrics = [json.loads(x) for x in run.metrics_path.read_text(encoding="utf-8").splitlines() if x.strip()]
            metrics = [m for m in metrics if m.get("step", 0) <= start]
    eos_ids = {tok.eos_token_id} | ({model.generation_config.eos_token_id} if isinstance(getattr(model.generation_config, "eos_token_id", None), int) else set(getattr(model.generation_config, "eos_token_id", None) or []))
    eos_ids.discard(None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def next_batch() -> list[int]:
        out = []
        while len(out) < rl.batch_size:
            if not order:
                order.extend(rng.sample(range(len(rows)), len(rows)))
            out.append(order.pop(0))
        return out

    bar = None
    import os

    if os.environ.get("TUNESMITH_NO_PROGRESS") != "1" and session.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start, desc="ppo", dynamic_ncols=True)
    context.model, context.tokenizer = model, tok
    context.emit("before_train")
    t0 = time.time()
    step = start
    try:
        for step in range(start + 1, max_steps + 1):
            idx = next_batch()
            batch_rows = [rows[i] for i in idx]
            texts = [render_prompt(tok, r["prompt"]) for r in batch_rows]
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            tok.padding_side = "right"
            n_prompt = enc["input_ids"].shape[1]
            # ---- rollout
            model.eval()
            gen_kwargs = dict(do_sample=True, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                              top_k=rl.top_k if rl.top_k > 0 else None, pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None)
            with torch.no_grad():
                seq = model.generate(**enc, **gen_kwargs, use_cache=True)
            comp = seq[:, n_prompt:]
            if comp.shape[1] == 0:
                raise TunesmithError("the policy generated no tokens")
            is_eos = torch.zeros_like(comp, dtype=torch.bool)
            for e in eos_ids:
                is_eos |= comp == e
            # keep tokens up to and including the first EOS
            after = (is_eos.cumsum(1) - is_eos.long()) > 0
            cmask = (~after).float()
            lengths = cmask.sum(1)
            comp = torch.where(after, torch.full_like(comp, pad_id), comp)
            seq = torch.cat([seq[:, :n_prompt], comp], 1)
            attn = torch.cat([enc["attention_mask"], cmask.long()], 1)
            completions = [tok.decode(c[: int(n)], skip_special_tokens=True) for c, n in zip(comp, lengths)]
            scores, per = rewards.score([prompt_text(r) for r in batch_rows], completions, batch_rows)
            score_t = torch.tensor(scores, dtype=torch.float32, device=device)
            # ---- old log-probs, reference log-probs, values
            with torch.no_grad():
                with (autocast or _null()):
                    old_lp, old_v = _forward(model, value_head, seq, attn, n_prompt, rl.temperature)
                    if is_peft:
                        with model.disable_adapter():
                            ref_lp, _ = _forward(model, value_head, seq, attn, n_prompt, rl.temperature, values=False)
                    else:
                        ref_lp, _ = _forward(ref_model, value_head, seq, attn, n_prompt, rl.temperature, values=False)
            old_lp, ref_lp, old_v = old_lp.float(), ref_lp.float(), old_v.float()
            kl_tok = (old_lp - ref_lp) * cmask
            tok_rewards = -kl_ctl.value * kl_tok
            last = (lengths.long() - 1).clamp(min=0)
            tok_rewards[torch.arange(len(idx)), last] += score_t
            adv, returns = gae(tok_rewards, old_v * cmask, cmask, rl.gamma, rl.lam)
            if rl.whiten_advantages:
                adv = _whiten(adv, cmask)
            # ---- PPO epochs
            model.train()
            stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
            for _epoch in range(rl.ppo_epochs):
                perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for mb_start in range(0, len(idx), rl.mini_batch_size):
                    mb = perm[mb_start : mb_start + rl.mini_batch_size].to(device)
                    m = cmask[mb]
                    with (autocast or _null()):
                        lp, v = _forward(model, value_head, seq[mb], attn[mb], n_prompt, rl.temperature)
                    lp, v = lp.float(), v.float()
                    ratio = torch.exp(lp - old_lp[mb])
                    a = adv[mb]
                    pg = _masked_mean(torch.max(-a * ratio, -a * ratio.clamp(1 - rl.cliprange, 1 + rl.cliprange)), m)
                    v_clip = old_v[mb] + (v - old_v[mb]).clamp(-rl.cliprange_value, rl.cliprange_value)
                    vf = 0.5 * _masked_mean(torch.max((v - returns[mb]) ** 2, (v_clip - returns[mb]) ** 2), m)
                    loss = pg + rl.vf_coef * vf
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if t.max_grad_norm and t.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        stats["policy_loss"].append(float(pg))
                        stats["value_loss"].append(float(vf))
                        stats["clipfrac"].append(float(_masked_mean(((ratio - 1).abs() > rl.cliprange).float(), m)))
                        stats["approx_kl"].append(float(0.5 * _masked_mean((lp - old_lp[mb]) ** 2, m)))
            seq_kl = float(kl_tok.sum(1).mean())
            row: dict[str, Any] = {
                "step": step,
                "reward": float(score_t.mean()),
                "reward_std": float(score_t.std()) if len(idx) > 1 else 0.0,
                "kl": seq_kl,
                "kl_coef": kl_ctl.value,
                "policy_loss": sum(stats["policy_loss"]) / len(stats["policy_loss"]),
                "value_loss": sum(stats["value_loss"]) / len(stats["value_loss"]),
                "clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
                "approx_kl": sum(stats["approx_kl"]) / len(stats["approx_kl"]),
                "response_length": float(lengths.mean()),
                "non_score_reward": float((-kl_ctl.value * kl_tok).sum(1).mean()),
                "learning_rate": scheduler.get_last_lr()[0],
                "time_s": round(time.time() - t0, 2),
            }
            for key, vals in per.items():
                row[f"rewards/{key}/mean"] = sum(vals) / len(vals)
            kl_ctl.update(seq_kl, rl.batch_size)
            metrics.append(row)
            session.log_row(row)  # metrics.jsonl, TensorBoard, ... and after_log
            if session.is_main:
                plot_rl(metrics, run.plots_dir / "rl.png")
            if bar is not None:
                bar.set_postfix({"reward": f"{row['reward']:.3f}", "kl": f"{seq_kl:.3f}"}, refresh=False)
                bar.update(1)
            results = context.emit("after_step", step=step, logs=dict(row))
            if any(r is True for r in results):
                context.stop_reason = context.stop_reason or "a plugin's after_step asked to stop"
            if t.save_steps > 0 and (step % t.save_steps == 0 or context.stop_reason) and step < max_steps:
                state = {"step": step, "kl_coef": kl_ctl.value, "rng": rng.getstate(), "order": order}
                if session.is_main:
                    _save_ppo_checkpoint(run.checkpoints_dir / f"checkpoint-{step}", model, method, value_head, optimizer, scheduler, state)
                    rotate_checkpoints(run.checkpoints_dir, t.save_total_limit, None)
            if context.stop_reason:
                break
    except BaseException as exc:
        session.fail(exc)
        raise
    finally:
        if bar is not None:
            bar.close()
    runtime = time.time() - t0
    fields: dict[str, Any] = {
        "steps": step,
        "runtime_s": round(runtime, 2),
        "learning_rate": lr,
        "prompts": len(rows),
        "kl_coef_final": kl_ctl.value,
        **curve_summary(metrics),
    }
    model.eval()
    session.save_final(model, fields)
    if session.is_main:
        from safetensors.torch import save as st_save

        from tunesmith.core.io import atomic_write_bytes

        atomic_write_bytes(run.root / "value_head.safetensors",
                           st_save({k: v.detach().contiguous() for k, v in value_head.state_dict().items()}))
    return fields


def _tuple_state(state: Any) -> Any:
    """random.setstate needs tuples where JSON gave lists."""
    return tuple(_tuple_state(x) for x in state) if isinstance(state, list) else state


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class PPO:
    name = "ppo"
    description = "Classic RLHF PPO (value head, GAE, adaptive KL) against reward-function plugins"
    batch_kind = None
    Options = PPOOptions

    def check(self, cfg: Any, options: PPOOptions, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError

        if options.batch_size % options.mini_batch_size:
            raise ConfigError(
                f"objective.batch_size ({options.batch_size}) must be a multiple of objective.mini_batch_size "
                f"({options.mini_batch_size})",
                key="objective.mini_batch_size", source=cfg.source,
            )
        if cfg.training.precision == "fp16":
            raise ConfigError("PPO runs in fp32 or bf16", key="training.precision", source=cfg.source)

    def train(self, session: Any, options: PPOOptions) -> dict:
        return train_ppo(session, options)


@hookimpl
def register_objectives(register: Any) -> None:
    register(PPO())
