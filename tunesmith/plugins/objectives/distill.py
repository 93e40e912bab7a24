"""``objective: distill`` - knowledge distillation from a teacher's token distributions.

The student is the run's model with any PEFT method; the teacher is a finished
tunesmith run (``teacher: runs/quickstart``: its base with the trained adapter,
merged) or any model source (``teacher: {source: hf, path: ...}``,
``{source: default}``, ...). At every completion token both models give a
distribution over the vocabulary (softened by ``temperature``), and the loss is
their divergence, averaged over the completion tokens:

* ``forward_kl``  ``KL(p_teacher || p_student)`` (mode covering, classic KD);
* ``reverse_kl``  ``KL(p_student || p_teacher)`` (mode seeking, MiniLLM);
* ``jsd``         the generalised Jensen-Shannon divergence of GKD (Agarwal et al.
  2024) with ``m = beta p_teacher + (1 - beta) p_student``:
  ``beta KL(p_teacher || m) + (1 - beta) KL(p_student || m)``; ``beta`` 0 / 1 is
  forward / reverse KL (TRL's ``beta``). The per-token values equal TRL's
  ``GKDTrainer.generalized_jsd_loss`` (tests/objectives/test_distill.py).

The tokens are the data's completions (off-policy) or, with probability
``on_policy`` per step, the student's own samples for the same prompts (GKD's
``lmbda``): the student answers the prompt up to the last assistant turn and the
teacher grades every sampled token. Teacher and student must share the tokenizer
(the same tokens with the same ids); the run stops with a ``ConfigError`` naming
the difference when they do not.

The data and batches are SFT's (chat/text records, completion-only masks,
``training.packing``); the loss is a loss plugin (``distill``, registered here)
that can be combined with others, e.g. ``losses: [{name: distill}, {name:
causal_lm, weight: 0.5}]`` to add the usual SFT term. Why not TRL's
``DistillationTrainer``/``GKDTrainer``: the first only trains on-policy, the
second is experimental and tokenises through SFTTrainer; as a loss plugin the run
keeps tunesmith's data path, Trainer, checkpoints and resume. The teacher runs at
the labelled positions only (its output head never sees the prompt).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith import hookimpl
from tunesmith.core.config import ModelSection

log = logging.getLogger("tunesmith.distill")

STATE_KEY = "distill"
IGNORE_INDEX = -100


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | ModelSection = Field(
        ..., description="A finished tunesmith run (RUN or RUN/final), a model folder, or a model-source section "
        "({source: hf, path: ...}); it must share the student's tokenizer.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), jsd = generalised JSD.")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd only: the teacher's share of the mixture (TRL's beta).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions.")
    on_policy: float = Field(0.0, ge=0, le=1, description="Share of steps trained on the student's own samples (GKD lmbda).")
    max_new_tokens: int = Field(64, ge=1, description="Longest student sample (on_policy > 0).")
    sample_temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's samples.")

    @model_validator(mode="before")
    @classmethod
    def _teacher_section(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("teacher"), dict) and "source" not in value["teacher"]:
            raise ValueError("teacher: a mapping needs 'source' (hf, gguf, default, hub, ...)")
        return value

    def beta_value(self) -> float:
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.beta)


# --------------------------------------------------------------------------- the math
def generalized_jsd(student_logits: Any, teacher_logits: Any, *, beta: float, temperature: float = 1.0) -> Any:
    """Per-position divergence ``[n]`` between two ``[n, V]`` logit tensors: ``beta`` 0
    is ``KL(teacher || student)``, 1 is ``KL(student || teacher)``, else the generalised JSD."""
    import math

    import torch

    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


# --------------------------------------------------------------------------- teacher
def load_teacher(teacher: str | ModelSection, cfg: Any, registries: Any, *, dtype: Any = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) of the teacher, frozen in eval mode."""
    from tunesmith.core.errors import ConfigError
    from tunesmith.core.models import INFO_FILE, load_from_dir, load_trained, resolve_model_dir

    if isinstance(teacher, ModelSection):
        path = resolve_model_dir(teacher, registries, base_dir=Path(cfg.base_dir) if cfg.base_dir else None)
        model, tok = load_from_dir(path, dtype=dtype)
        what = f"{teacher.source} model {path}"
    else:
        p = Path(cfg.resolve_path(teacher))
        if (p / INFO_FILE).exists() or (p / "final" / INFO_FILE).exists():
            model, tok, info = load_trained(p, registries=registries, dtype=dtype, merge=True)
            what = f"tunesmith run {p} ({info.get('objective')}, {info.get('peft', {}).get('method')})"
        elif (p / "config.json").exists():
            model, tok = load_from_dir(p, dtype=dtype)
            what = f"model folder {p}"
        else:
            raise ConfigError(
                f"teacher {teacher!r}: {p} is neither a finished tunesmith run (no final/{INFO_FILE}) nor a model folder "
                "(no config.json)", key="objective.teacher", source=cfg.source,
            )
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, tok, what


def tokenizer_mismatch(student_tok: Any, teacher_tok: Any) -> str | None:
    """What differs between two tokenizers' vocabularies, or None when they are the same."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return None
    only_s = sorted((t for t in sv if t not in tv), key=sv.get)[:5]
    only_t = sorted((t for t in tv if t not in sv), key=tv.get)[:5]
    moved = sorted((t for t in sv if t in tv and sv[t] != tv[t]), key=sv.get)[:5]
    parts = [f"the student has {len(sv)} tokens, the teacher {len(tv)}"]
    if only_s:
        parts.append(f"only the student has {', '.join(map(repr, only_s))}")
    if only_t:
        parts.append(f"only the teacher has {', '.join(map(repr, only_t))}")
    if moved:
        parts.append(f"different ids for {', '.join(f'{t!r} ({sv[t]} vs {tv[t]})' for t in moved)}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- on-policy samples
def student_samples(model: Any, tokenizer: Any, batch: dict, options: DistillOptions) -> dict:
    """The batch with every row's last completion replaced by the student's sample for
    the same prompt: ``{"input_ids", "attention_mask", "labels"}`` (right-padded,
    labels on the sampled tokens up to and including the end-of-turn token)."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    attn = batch.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = []
    for i in range(ids.shape[0]):
        n = int(attn[i].sum())
        lab = (labels[i, :n] != IGNORE_INDEX).tolist()
        starts = [p for p in range(n) if lab[p] and (p == 0 or not lab[p - 1])]
        prompts.append(ids[i, : starts[-1] if starts else n])
    P = max(len(p) for p in prompts)
    left = torch.full((len(prompts), P), pad, dtype=ids.dtype, device=ids.device)
    lmask = torch.zeros_like(left)
    for i, p in enumerate(prompts):
        left[i, P - len(p):] = p
        lmask[i, P - len(p):] = 1
    gen_cfg = getattr(model, "generation_config", None)
    eos = {tokenizer.eos_token_id}
    g_eos = getattr(gen_cfg, "eos_token_id", None)
    eos |= set([g_eos] if isinstance(g_eos, int) else (g_eos or []))
    eos.discard(None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=left, attention_mask=lmask, do_sample=True, temperature=options.sample_temperature,
                                 top_p=1.0, top_k=0, max_new_tokens=options.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=sorted(eos) or None, use_cache=True)
    finally:
        model.train(was_training)
    rows = []
    for i, p in enumerate(prompts):
        g = out[i, P:].tolist()
        end = next((j + 1 for j, t in enumerate(g) if t in eos), len(g))
        g = g[:end] or [pad]
        rows.append((p.tolist() + g, len(p)))
    T = max(len(r) for r, _ in rows)
    new_ids = torch.full((len(rows), T), pad, dtype=ids.dtype, device=ids.device)
    new_attn = torch.zeros_like(new_ids)
    new_labels = torch.full_like(new_ids, IGNORE_INDEX)
    for i, (r, n_prompt) in enumerate(rows):
        t = torch.tensor(r, dtype=ids.dtype, device=ids.device)
        new_ids[i, : len(r)] = t
        new_attn[i, : len(r)] = 1
        new_labels[i, n_prompt: len(r)] = t[n_prompt:]
    return {"input_ids": new_ids, "attention_mask": new_attn, "labels": new_labels}


# --------------------------------------------------------------------------- the loss plugin
def _logits_at_labels(model: Any, inputs: dict, labels: Any) -> Any:
    """``[n, V]`` logits at the labelled positions (the output head runs there only when it can)."""
    from tunesmith.core.labelled import labelled_forward, shifted_labels

    got = labelled_forward(model, inputs, labels)
    if got is not None:
        return got[0]
    out = model(**inputs, use_cache=False)
    logits = out.logits[:, -labels.shape[1]:]
    keep = shifted_labels(labels).ne(IGNORE_INDEX)
    return logits[keep.to(logits.device)]


class DistillLoss:
    name = "distill"
    description = "Divergence from the teacher's token distributions (objective: distill holds the teacher and options)."
    requires = "tokens"

    def setup(self, model: Any, options: Any, context: Any) -> None:
        from tunesmith.core.errors import ConfigError

        state = context.state if context is not None else {}
        st = state.get(STATE_KEY)
        if st is None:
            raise ConfigError("the distill loss needs objective: distill (which names the teacher)", key="losses")
        if "teacher" in st:
            return
        session = state.get("session")
        opts: DistillOptions = st["options"]
        dtype = next(model.parameters()).dtype
        teacher, t_tok, what = load_teacher(opts.teacher, session.cfg, session.registries, dtype=dtype)
        s_tok = session.tokenizer
        diff = tokenizer_mismatch(s_tok, t_tok)
        if diff is not None:
            raise ConfigError(
                f"the teacher ({what}) and the student do not share a tokenizer: {diff}. Distillation compares the two "
                "models' distributions token by token, so both need the same vocabulary: pick a teacher of the "
                "student's model family, or a tunesmith run trained from the same base",
                key="objective.teacher", source=session.cfg.source,
            )
        if getattr(s_tok, "chat_template", None) != getattr(t_tok, "chat_template", None):
            session.say("note: the teacher's chat template differs from the student's; the teacher reads the "
                        "conversations as the student's template renders them")
        teacher.to(next(model.parameters()).device)
        st.update(teacher=teacher, teacher_name=what, tokenizer=s_tok,
                  vocab=len(s_tok), rng=random.Random(session.cfg.training.seed))
        session.say(f"distill: teacher {what}; {opts.divergence}"
                    + (f" (beta {opts.beta:g})" if opts.divergence == "jsd" else "")
                    + f", temperature {opts.temperature:g}" + (f", on-policy share {opts.on_policy:g}" if opts.on_policy else ""))

    def compute(self, model: Any, batch: dict, options: Any, context: Any) -> tuple[Any, dict]:
        import torch

        state = context.state if context is not None else {}
        st = state.get(STATE_KEY) or {}
        if "teacher" not in st:
            self.setup(model, options, context)
            st = state[STATE_KEY]
        opts: DistillOptions = st["options"]
        on_policy = bool(model.training and opts.on_policy > 0 and st["rng"].random() < opts.on_policy)
        if on_policy:
            inputs = student_samples(model, st["tokenizer"], batch, opts)
            labels = inputs.pop("labels")
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            labels = batch["labels"]
        s_logits = _logits_at_labels(model, inputs, labels)
        with torch.no_grad():
            t_logits = _logits_at_labels(st["teacher"], inputs, labels)
        V = st["vocab"]
        if s_logits.shape[-1] < V or t_logits.shape[-1] < V:
            from tunesmith.core.errors import TunesmithError

            raise TunesmithError(f"a model's output ({s_logits.shape[-1]} student, {t_logits.shape[-1]} teacher logits) "
                                 f"is narrower than the tokenizer ({V} tokens)")
        s_logits, t_logits = s_logits[..., :V], t_logits[..., :V]  # padded vocabularies: the tokenizer's part
        per_token = generalized_jsd(s_logits, t_logits, beta=opts.beta_value(), temperature=opts.temperature)
        loss = per_token.mean() if per_token.numel() else s_logits.sum() * 0.0
        with torch.no_grad():
            kl = generalized_jsd(s_logits.detach(), t_logits, beta=0.0) if opts.divergence != "forward_kl" or opts.temperature != 1 else per_token.detach()
        logs = {"divergence": float(loss.detach()), "kl": float(kl.mean()) if kl.numel() else 0.0,
                "on_policy": float(on_policy), "tokens": float(per_token.numel())}
        return loss, logs


# --------------------------------------------------------------------------- the objective
class Distill:
    name = "distill"
    description = "Knowledge distillation: forward/reverse KL or generalised JSD to a teacher's token distributions, optional on-policy (GKD)"
    batch_kind = "tokens"
    default_losses = ("distill",)
    Options = DistillOptions

    def check(self, cfg: Any, options: DistillOptions, registries: Any) -> None:
        from tunesmith.core.errors import ConfigError

        if cfg.losses and not any(spec.plugin_name == "distill" for spec in cfg.losses):
            raise ConfigError("objective distill trains through the distill loss: add {name: distill} to losses",
                              key="losses", source=cfg.source)
        if options.on_policy > 0 and cfg.training.packing not in (False, None, "group_by_length"):
            raise ConfigError("on-policy samples replace each example's completion: they need unpacked rows "
                              "(training.packing: false)", key="training.packing", source=cfg.source)

    def train(self, session: Any, options: DistillOptions) -> dict:
        from tunesmith.core.training import train_on_tokens

        session.context.state[STATE_KEY] = {"options": options}
        fields = train_on_tokens(session)
        st = session.context.state.get(STATE_KEY) or {}
        fields["teacher"] = st.get("teacher_name")
        trainer = session.context.state.get("trainer")
        kls = [r["distill/kl"] for r in getattr(getattr(trainer, "state", None), "log_history", []) if "distill/kl" in r]
        if kls:
            fields["kl_first"], fields["kl_last"] = float(kls[0]), float(kls[-1])
        st.pop("teacher", None)  # free the teacher's memory
        return fields


@hookimpl
def register_objectives(register: Any) -> None:
    register(Distill())


@hookimpl
def register_losses(register: Any) -> None:
    register(DistillLoss())
