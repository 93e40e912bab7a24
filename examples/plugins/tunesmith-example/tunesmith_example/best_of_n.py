"""A training objective from a third-party package: best-of-n rejection sampling.

``objective: {name: best_of_n, n: 4, rewards: [...]}``: for each prompt the model
samples ``n`` completions, the reward plugins score them, and the model is
fine-tuned (SFT, the configured loss plugins) on the best completion of each
prompt whose reward reaches ``min_reward`` (RAFT / ReST-style rejection sampling,
one round). Everything else - run directory, resume, checkpoints, metrics, the
final adapter, lifecycle hooks - is tunesmith's training session: this file and
one entry-point line are all it takes.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tunesmith import hookimpl
from tunesmith.core.rewards import PolicyOptions


class BestOfNOptions(PolicyOptions):
    n: int = Field(4, ge=2, description="Completions sampled per prompt.")
    min_reward: float = Field(0.0, description="Keep a prompt's best completion only if its reward reaches this.")


class BestOfN:
    name = "best_of_n"
    description = "Best-of-n rejection sampling: sample n completions, SFT on the best one per prompt (reward plugins)"
    batch_kind = "tokens"
    default_losses = ("causal_lm",)
    Options = BestOfNOptions

    def train(self, session: Any, options: BestOfNOptions) -> dict:
        import torch

        from tunesmith.core.render import render_prompt
        from tunesmith.core.rewards import RewardSet, load_prompts, prompt_text
        from tunesmith.core.training import build_datasets, tokenize_records

        cfg = session.cfg
        rows = load_prompts(cfg, options)
        rewards = RewardSet(cfg, options, session.registries, session.context)
        model, tok = session.prepare_model()
        chosen: list[dict] = []
        scores: list[float] = []
        model.eval()
        for row in rows:
            enc = tok(render_prompt(tok, row["prompt"]), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, num_return_sequences=options.n, max_new_tokens=options.max_new_tokens,
                                     temperature=options.temperature, top_p=options.top_p,
                                     top_k=options.top_k or None, pad_token_id=tok.pad_token_id)
            texts = [tok.decode(seq[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for seq in out]
            total, _ = rewards.score([prompt_text(row)] * len(texts), texts, [row] * len(texts))
            best = max(range(len(texts)), key=lambda i: total[i])
            scores.append(total[best])
            if total[best] >= options.min_reward and texts[best]:
                chosen.append({"messages": list(row["prompt"]) + [{"role": "assistant", "content": texts[best]}]})
        model.train()
        session.say(f"best_of_n: kept {len(chosen)} of {len(rows)} prompts; mean best reward {sum(scores) / len(scores):.3f}")
        examples, _stats = tokenize_records(chosen, tok, cfg, objective=self.name)
        train_ds, collator = build_datasets(examples, cfg, tok)
        lr = session.learning_rate(len(chosen), override=options.learning_rate)
        args = session.training_arguments(has_eval=False, learning_rate=lr)
        trainer, out, runtime = session.run_trainer(args=args, train_ds=train_ds, eval_ds=None, collator=collator)
        fields = {
            "train_loss": float(out.training_loss),
            "steps": int(trainer.state.global_step),
            "runtime_s": round(runtime, 2),
            "learning_rate": lr,
            "prompts": len(rows),
            "kept": len(chosen),
            "best_reward_mean": sum(scores) / len(scores),
        }
        session.save_final(trainer.accelerator.unwrap_model(trainer.model), fields)
        return fields


@hookimpl
def register_objectives(register: Any) -> None:
    register(BestOfN())
