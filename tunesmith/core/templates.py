"""Chat templates: which one a run uses, and making the tokenizer and model fit it.

``apply_chat_template(cfg, tokenizer, model, registries)`` is called by the
training session right after the base model loads and before the PEFT method is
applied. It

1. chooses the template: ``chat_template:`` of the config (a built-in name from
   the ``chat_templates`` plugin area, or a path to a Jinja file), else the
   tokenizer's own, else :data:`DEFAULT_TEMPLATE` (``alpaca``, the guide's
   ``### Instruction / ### Response`` form, which needs no new token) for a base
   model whose tokenizer ships none; the choice is said in one line;
2. sets it as ``tokenizer.chat_template`` (so ``save_pretrained`` writes it beside
   every adapter and merged model, and the GGUF writer copies it into
   ``tokenizer.chat_template``);
3. adds the special tokens the template writes that the vocabulary lacks, resizes
   the embeddings (new rows start at the mean of the old ones) and lists the rows
   to train: the added tokens (existing template tokens whose rows look untrained,
   as Llama-3 base models ship ``<|eot_id|>``, are reported, not retrained);
4. makes the end-of-turn token the EOS and keeps the pad distinct from EOS where
   the vocabulary has a spare token (:func:`tunesmith.core.models.setup_tokenizer`).

It returns what the run records (``final/tunesmith.json`` ``template``): the
name, where it came from, its SHA-256, the end-of-turn, EOS and pad tokens, the
added tokens, the embedding resize and ``trainable_token_indices`` in peft's
form (``{"embed_tokens": [ids], "lm_head": [ids]}``; ``None`` when nothing new
must be trained), which the LoRA-family PEFT methods pass to peft so the adapter
saves those rows and plain ``peft.PeftModel.from_pretrained`` loads it on a base
whose embeddings were resized to the tokenizer (see docs/models.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.core.errors import ConfigError

log = logging.getLogger("tunesmith.templates")

#: the template a tokenizer without one gets (a plugin of the chat_templates area)
DEFAULT_TEMPLATE = "alpaca"
#: set on a tokenizer that got the default template at load time (no template of its own)
DEFAULT_MARK = "_tunesmith_default_template"

#: ``<|...|>`` literals in a Jinja file: special tokens the template writes
_SPECIAL_LITERAL = re.compile(r"<\|[A-Za-z0-9_.\-]{1,48}\|>")
#: other marker-looking literals (``<start_of_turn>``); used only when already in the vocabulary
_ANGLE_LITERAL = re.compile(r"<[a-z][a-z0-9_]{1,40}>")


@dataclass
class TemplateChoice:
    """A chosen chat template."""

    template: str
    source: str  # config | file | tokenizer | default
    name: str | None = None
    path: str | None = None
    plugin: Any = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    def member(self, name: str) -> Any:
        from tunesmith.core.registry import member

        if self.plugin is None:
            return None
        return member(self.plugin, "chat_templates", name)


def _registries(registries: Any) -> Any:
    if registries is not None:
        return registries
    from tunesmith.core.plugins import get_registries

    return get_registries()


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def looks_like_path(spec: str) -> bool:
    return spec.endswith((".jinja", ".j2", ".jinja2", ".txt")) or "/" in spec or os.sep in spec


def resolve_template(spec: str, registries: Any = None, *, base_dir: str | Path | None = None,
                     key: str = "chat_template") -> TemplateChoice:
    """A built-in template by name, or a Jinja file (relative to ``base_dir``)."""
    regs = _registries(registries)
    if spec in regs.chat_templates:
        obj = regs.chat_templates.get(spec)
        return TemplateChoice(template=str(obj.template), source="config", name=spec, plugin=obj)
    if looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if not p.is_file():
            raise ConfigError(f"chat template file not found: {p}", key=key,
                              hint="give a built-in name (" + ", ".join(regs.chat_templates.names()) + ") or a Jinja file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the chat template {p}: {exc}", key=key) from None
        check_jinja(text, where=str(p), key=key)
        return TemplateChoice(template=text, source="file", name=p.stem, path=str(p.resolve()))
    regs.chat_templates.get(spec)  # raises PluginNotFound with the nearest name
    raise AssertionError("unreachable")  # pragma: no cover


def check_jinja(text: str, *, where: str = "chat template", key: str = "chat_template") -> None:
    """Refuse a template that does not compile or does not render a simple conversation."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(text)
        compiled.render(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                        add_generation_prompt=False, bos_token="", eos_token="")
    except Exception as exc:  # noqa: BLE001 - jinja raises many kinds
        raise ConfigError(f"{where}: not a usable chat template: {type(exc).__name__}: {exc}", key=key) from None


def template_tokens(choice: TemplateChoice, tokenizer: Any) -> list[str]:
    """The special tokens ``choice`` writes: the plugin's ``special_tokens``, or for a
    Jinja file (and a tokenizer's own template) its ``<|...|>`` literals plus other
    ``<marker>`` literals the vocabulary already holds."""
    declared = choice.member("special_tokens")
    if declared is not None and choice.plugin is not None:
        return [t for t in declared if t]
    vocab = tokenizer.get_vocab()
    found = list(dict.fromkeys(_SPECIAL_LITERAL.findall(choice.template)))
    found += [t for t in dict.fromkeys(_ANGLE_LITERAL.findall(choice.template)) if t in vocab and t not in found]
    return found


def detect_builtin(tokenizer: Any, registries: Any = None) -> tuple[str | None, str | None]:
    """``(name, default_system)`` of the built-in template that renders exactly as the
    tokenizer's own (``default_system``: the system prompt the tokenizer's template
    adds when a conversation has none), or ``(None, None)``."""
    own = getattr(tokenizer, "chat_template", None)
    if not own or not isinstance(own, str):
        return None, None
    regs = _registries(registries)
    convs = [
        [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "U2"}],
    ]
    bare = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    saved = tokenizer.chat_template
    try:
        mine = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs + [bare]]
    except Exception:  # noqa: BLE001
        return None, None
    for name, obj in regs.chat_templates.items():
        try:
            tokenizer.chat_template = str(obj.template)
            theirs = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
            if theirs != mine[: len(convs)]:
                continue
            plain = tokenizer.apply_chat_template(bare, tokenize=False, add_generation_prompt=True)
            if plain == mine[-1]:
                return name, None
            mark = "\x00SYSTEM\x00"
            with_sys = tokenizer.apply_chat_template([{"role": "system", "content": mark}] + bare, tokenize=False,
                                                     add_generation_prompt=True)
            pre, _, post = with_sys.partition(mark)
            if mine[-1].startswith(pre) and mine[-1].endswith(post) and len(mine[-1]) >= len(pre) + len(post):
                return name, mine[-1][len(pre): len(mine[-1]) - len(post)]
        except Exception:  # noqa: BLE001 - a template that cannot render these is not a match
            continue
        finally:
            tokenizer.chat_template = saved
    return None, None


def default_template(registries: Any = None) -> TemplateChoice:
    regs = _registries(registries)
    if DEFAULT_TEMPLATE not in regs.chat_templates:
        raise ConfigError(
            f"the tokenizer has no chat template and the default '{DEFAULT_TEMPLATE}' is not available (plugin disabled?)",
            key="chat_template", hint="set chat_template: to a built-in name or a Jinja file",
        )
    obj = regs.chat_templates.get(DEFAULT_TEMPLATE)
    return TemplateChoice(template=str(obj.template), source="default", name=DEFAULT_TEMPLATE, plugin=obj)


def ensure_template(tokenizer: Any, registries: Any = None) -> str | None:
    """Give a tokenizer without a chat template the default one (tokenizer only: the
    default needs no new token). Returns the name set, or None when it had one."""
    if getattr(tokenizer, "chat_template", None):
        return None
    choice = default_template(registries)
    tokenizer.chat_template = choice.template
    setattr(tokenizer, DEFAULT_MARK, choice.name)
    return choice.name


def choose(cfg: Any, tokenizer: Any, registries: Any = None) -> TemplateChoice:
    """The template a run uses (see the module docstring, step 1)."""
    spec = getattr(cfg, "chat_template", None) if cfg is not None else None
    if spec:
        base_dir = getattr(cfg, "base_dir", None)
        return resolve_template(str(spec), registries, base_dir=base_dir)
    own = getattr(tokenizer, "chat_template", None)
    if own and not getattr(tokenizer, DEFAULT_MARK, None):
        if not isinstance(own, str):  # several named templates: transformers uses "default"
            own = dict(own).get("default") if isinstance(own, dict) else None
            if not own:
                return default_template(registries)
        name, _ = detect_builtin(tokenizer, registries)
        return TemplateChoice(template=own, source="tokenizer", name=name)
    return default_template(registries)


def _rows_untrained(model: Any, ids: list[int]) -> list[int]:
    """Of ``ids``, the input-embedding rows whose norm is under a tenth of the median
    row norm: tokens the base model never learned (reserved tokens of base models)."""
    import torch

    emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    if w is None or w.is_meta or not ids:
        return []
    with torch.no_grad():
        norms = w.detach().float().norm(dim=1)
        median = float(norms.median())
        return [i for i in ids if 0 <= i < norms.numel() and float(norms[i]) < 0.1 * median]


def _module_leaf(model: Any, module: Any) -> str | None:
    for name, mod in model.named_modules():
        if mod is module:
            return name.rsplit(".", 1)[-1]
    return None


def uses_trainable_tokens(model: Any) -> bool:
    """Whether any adapter of a PeftModel trains token rows (``trainable_token_indices``)."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "trainable_token_indices", None) for c in configs.values())


def adapter_save_kwargs(model: Any) -> dict:
    """``save_pretrained`` arguments for a PeftModel.

    When the run's chat template added tokens (the embeddings were resized and the new
    rows are peft trainable tokens), peft's ``save_embedding_layers="auto"`` sees the
    resized vocabulary and saves both full embedding matrices (input and, untied,
    output: ~226 MB on SmolLM2-135M). The trainable tokens already hold the trained
    rows as full values (they overwrite whatever a resize put there), so
    ``save_embedding_layers=False`` keeps the adapter to the rows it trained; a base
    resized to the adapter's tokenizer loads it with plain ``PeftModel.from_pretrained``.
    The final adapter and every mid-run checkpoint are saved with these arguments.
    """
    return {"save_embedding_layers": False} if uses_trainable_tokens(model) else {}


def trainable_token_indices(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """peft's ``trainable_token_indices`` for ``ids``: the input embedding, plus the
    output head when it is not tied to it (a tied head follows the embedding)."""
    if not ids:
        return None
    ids = sorted(set(int(i) for i in ids))
    out: dict[str, list[int]] = {}
    inp = model.get_input_embeddings()
    name = _module_leaf(model, inp)
    if name is None:
        return None
    out[name] = ids
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if head is not None and not tied and getattr(head, "weight", None) is not inp.weight:
        hname = _module_leaf(model, head)
        if hname:
            out[hname] = ids
    return out


def apply_chat_template(cfg: Any, tokenizer: Any, model: Any, registries: Any = None, *, quiet: bool = False) -> dict:
    """Choose the run's chat template and make tokenizer and model fit it.

    Changes ``tokenizer`` (template, added tokens, EOS, pad) and ``model`` (resized
    embeddings, pad/EOS ids in its configs) in place; returns the record described
    in the module docstring.
    """

    regs = _registries(registries)
    choice = choose(cfg, tokenizer, regs)
    tokenizer.chat_template = choice.template
    if choice.source != "default" and hasattr(tokenizer, DEFAULT_MARK):
        delattr(tokenizer, DEFAULT_MARK)
    if choice.source == "default":
        setattr(tokenizer, DEFAULT_MARK, choice.name)
        if not quiet:
            _say(f"chat template: the tokenizer has none; using '{choice.name}' ({choice.plugin.description}), "
                 "the default for base models (set chat_template: to choose another)")
    elif choice.source in ("config", "file") and not quiet:
        _say(f"chat template: '{choice.name}'" + (f" from {choice.path}" if choice.path else ""))

    # special tokens the template writes
    wanted = template_tokens(choice, tokenizer)
    declared_eot = choice.member("end_of_turn")
    if declared_eot and declared_eot not in wanted:
        wanted.append(declared_eot)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    to_mark = [t for t in wanted if t not in specials]
    if to_mark:  # existing tokens become special (never split); missing ones get new ids
        tokenizer.add_special_tokens({"additional_special_tokens": to_mark}, replace_extra_special_tokens=False) \
            if _has_kw(tokenizer.add_special_tokens, "replace_extra_special_tokens") else \
            tokenizer.add_special_tokens({"additional_special_tokens": to_mark}, replace_additional_special_tokens=False)
    if declared_eot:
        tokenizer.eos_token = declared_eot
    setup_tokenizer(tokenizer, padding_side=getattr(tokenizer, "padding_side", "right") or "right")

    eot = end_of_turn_token(tokenizer) or tokenizer.eos_token

    # embeddings
    resized = None
    emb = model.get_input_embeddings()
    rows = int(emb.num_embeddings) if hasattr(emb, "num_embeddings") else int(emb.weight.shape[0])
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        resized = [rows, len(tokenizer)]
    added_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in missing]
    # ids inside the old vocabulary size but beyond the trained rows (padded vocabularies)
    known = [int(tokenizer.convert_tokens_to_ids(t)) for t in wanted if t not in missing]
    # Only rows the template added are trained as extra tokens: training existing rows
    # would change every run on a model whose template tokens exist (and TRL's
    # trainers do not take peft's trainable-token wrappers). Existing rows that look
    # untrained (Llama-3 base models ship <|eot_id|> near zero) are reported.
    untrained = _rows_untrained(model, known)
    if untrained:
        log.warning("template token(s) %s have near-zero embedding rows (untrained in the base model); "
                    "LoRA does not train them - consider peft.modules_to_save: [embed_tokens, lm_head]",
                    ", ".join(tokenizer.convert_ids_to_tokens(i) for i in untrained))
    train_ids = sorted(set(added_ids))
    sync_model_tokens(model, tokenizer)
    record: dict[str, Any] = {
        "name": choice.name,
        "source": choice.source,
        "sha256": choice.sha256,
        "end_of_turn": eot,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "pad_is_eos": tokenizer.pad_token == tokenizer.eos_token,
        "added_tokens": missing,
        "resized_embeddings": resized,
        "trainable_tokens": {tokenizer.convert_ids_to_tokens(i): i for i in train_ids},
        "trainable_token_indices": trainable_token_indices(model, train_ids),
    }
    if choice.path:
        record["path"] = choice.path
    system = choice.member("default_system")
    if choice.plugin is None and choice.source == "tokenizer":
        name, system = detect_builtin(tokenizer, regs)
    if system:
        record["default_system"] = system
    if missing and not quiet:
        _say(f"chat template: added {len(missing)} token(s) to the vocabulary ({', '.join(missing)}); "
             f"embeddings resized {resized[0] if resized else rows} -> {len(tokenizer)}; their rows are trained and saved with the adapter")
    return record


def _has_kw(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def stop_tokens(tokenizer: Any, registries: Any = None) -> list[str]:
    """Stop strings for a server of this tokenizer's template: the end-of-turn token,
    EOS and the built-in template's own ``stop`` (when the template is a built-in)."""

    out: list[str] = []
    for t in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if t and t not in out:
            out.append(t)
    name, _ = detect_builtin(tokenizer, registries)
    if name:
        obj = _registries(registries).chat_templates.get(name)
        from tunesmith.core.registry import member

        for t in member(obj, "chat_templates", "stop") or ():
            if t not in out:
                out.append(t)
    return out


# --------------------------------------------------------------------------- tokenizer fitting
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|fim_pad|>", "<|endoftext|>", "<empty_output>",
                   "<|reserved_special_token_0|>", "<unused0>", "<unk>")


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token the chat template puts after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``, ...), or None when the template puts none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "QQQZ"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - odd templates
        return None
    tail = text.split("QQQZ", 1)[-1]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {}), key=len, reverse=True)
    tail = tail.lstrip()
    for tok in specials:
        if tok and tail.startswith(tok):
            return tok
    return None


def setup_tokenizer(tokenizer: Any, *, padding_side: str = "right", default_template: bool = True,
                    registries: Any = None) -> Any:
    """Make a tokenizer safe to train with; returns it (changed in place).

    * a tokenizer with no chat template gets the default one for base models
      (:data:`tunesmith.core.templates.DEFAULT_TEMPLATE`, which needs no new
      token), so rendering never fails and training, evaluation and export agree;
      ``default_template=False`` leaves it without;
    * EOS becomes the chat template's end-of-turn token when they differ, so
      generation stops where an assistant turn ends;
    * the pad token is kept distinct from EOS where the vocabulary has a spare
      special token (so no collator can mask EOS as padding); without one it falls
      back to EOS, which is safe here because labels are masked explicitly;
    * ``padding_side`` is right for training (pass ``"left"`` for batched generation).
    """
    if default_template and not getattr(tokenizer, "chat_template", None):
        ensure_template(tokenizer, registries)
    eot = end_of_turn_token(tokenizer)
    if eot and eot != tokenizer.eos_token:
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        vocab = tokenizer.get_vocab()
        for cand in _PAD_CANDIDATES:
            if cand in vocab and cand != tokenizer.eos_token:
                tokenizer.pad_token = cand
                break
        else:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# --------------------------------------------------------------------------- models
def sync_model_tokens(model: Any, tokenizer: Any) -> None:
    """Make the model's config and generation config agree with the tokenizer's pad/EOS."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        eos = gen.eos_token_id
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_list:
            eos_list.insert(0, tokenizer.eos_token_id)
        gen.eos_token_id = eos_list[0] if len(eos_list) == 1 else eos_list
