"""Evaluation sets: reading them, rendering them for a model, generating from them.

Shared by the built-in evaluators and the human-evaluation export. A row of an
evaluation set is one of:

* ``{"prompt": str, "expected": str}`` (``expected`` is optional and may also be
  called ``answer``, ``reference``, ``response``, ``completion``, ``output`` or
  ``label``);
* a canonical chat record ``{"messages": [...]}``: the last assistant turn is the
  expected answer and everything before it the prompt;
* an alpaca row ``{"instruction", "input", "output"}``;
* ``{"text": str}`` (perplexity only);
* anything else the data formats of :func:`tunesmith.core.data.load_records` read.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tunesmith.core.errors import DataError
from tunesmith.core.io import iter_jsonl
from tunesmith.core.labelled import IGNORE_INDEX, labelled_forward, shifted_labels

EXPECTED_KEYS = ("expected", "answer", "reference", "response", "completion", "output", "label", "target")


@dataclass
class EvalRow:
    """One evaluation example. ``line`` is its 1-based row in ``source``."""

    prompt: list[dict] | None = None  # chat messages ending before the answer
    expected: str | None = None
    text: str | None = None  # raw text (perplexity of a corpus)
    source: str = ""
    line: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def messages(self) -> list[dict] | None:
        """The full conversation (prompt + expected answer), for perplexity."""
        if self.prompt is None:
            return None
        if self.expected is None:
            return list(self.prompt)
        return list(self.prompt) + [{"role": "assistant", "content": self.expected}]

    @property
    def prompt_text(self) -> str:
        """The last user turn (or the text), for reports."""
        if self.prompt:
            for m in reversed(self.prompt):
                if m.get("role") == "user":
                    return str(m.get("content", ""))
            return str(self.prompt[-1].get("content", ""))
        return self.text or ""


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line, row) pairs of a JSONL / JSON / CSV file; clear errors for broken input."""
    if not path.exists():
        raise DataError("file not found", path=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None
    if not text.strip():
        raise DataError("the file is empty: an evaluation set needs at least one row", path=str(path))
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(i + 2, dict(r)) for i, r in enumerate(reader)]
    if suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=str(path), line=exc.lineno) from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError("a JSON evaluation set must be a list of objects", path=str(path))
        return [(i + 1, r) for i, r in enumerate(data)]
    return list(iter_jsonl(text, path))


def _expected_of(row: dict) -> str | None:
    for k in EXPECTED_KEYS:
        v = row.get(k)
        if v is not None and not isinstance(v, (dict, list)):
            return str(v)
    return None


def _valid_messages(msgs: Any) -> bool:
    return (
        isinstance(msgs, list)
        and len(msgs) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
    )


def _row_to_eval(row: Any, path: Path, line: int) -> EvalRow | None:
    if not isinstance(row, dict):
        raise DataError(f"each row must be a JSON object, got {type(row).__name__}", path=str(path), line=line)
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    msgs = row.get("messages")
    if msgs is not None:
        if not _valid_messages(msgs):
            raise DataError("'messages' must be a non-empty list of {role, content} objects", path=str(path), line=line)
        if msgs[-1]["role"] == "assistant":
            prompt, expected = msgs[:-1], msgs[-1]["content"]
        else:
            prompt, expected = msgs, _expected_of(row)
        if not prompt:
            raise DataError("the conversation has no prompt before the assistant's answer", path=str(path), line=line)
        return EvalRow(prompt=list(prompt), expected=expected, source=str(path), line=line, metadata=meta)
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        sys_msg = row.get("system")
        p = ([{"role": "system", "content": str(sys_msg)}] if sys_msg else []) + [{"role": "user", "content": prompt}]
        return EvalRow(prompt=p, expected=_expected_of(row), source=str(path), line=line, metadata=meta)
    if _valid_messages(prompt):
        return EvalRow(prompt=list(prompt), expected=_expected_of(row), source=str(path), line=line, metadata=meta)
    if isinstance(row.get("instruction"), str):
        user = row["instruction"]
        if row.get("input"):
            user += "\n\n" + str(row["input"])
        return EvalRow(
            prompt=[{"role": "user", "content": user}], expected=_expected_of(row), source=str(path), line=line, metadata=meta
        )
    if isinstance(row.get("text"), str):
        return EvalRow(text=row["text"], source=str(path), line=line, metadata=meta)
    return None


def load_eval_rows(
    path: str | Path,
    *,
    need: str = "prompt",
    need_expected: bool = False,
    limit: int | None = None,
    registries: Any = None,
) -> list[EvalRow]:
    """Read an evaluation set.

    :param need: ``"prompt"`` (generation: every row needs a prompt) or ``"any"``
        (perplexity: a prompt+answer or a text).
    :param need_expected: every row must carry an expected answer.
    Raises :class:`DataError` naming the file and row for a row without the fields.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".txt", ".md", ".parquet", ".gz"):
        rows = _records_via_formats(path, registries)
    else:
        rows = _read_rows(path)
    out: list[EvalRow] = []
    unknown: list[tuple[int, Any]] = []
    for line, row in rows:
        ev = _row_to_eval(row, path, line)
        if ev is None:
            unknown.append((line, row))
        out.append(ev)  # type: ignore[arg-type]
    if unknown:
        converted = _convert_with_formats(path, registries)
        if converted is None or len(converted) != len(rows):
            line, row = unknown[0]
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"row has none of the fields an evaluation set needs ('prompt', 'messages', 'instruction' or 'text'); found: {keys}",
                path=str(path),
                line=line,
            )
        out = [o if o is not None else _row_to_eval(c, path, ln) for o, c, (ln, _) in zip(out, converted, rows)]
    for ev in out:
        if ev is None:  # pragma: no cover - converted rows are canonical
            raise DataError("row could not be read", path=str(path))
        if need == "prompt" and ev.prompt is None:
            raise DataError(
                "row has no prompt ('prompt', 'messages' or 'instruction'): a raw 'text' row can only be used for perplexity",
                path=str(path),
                line=ev.line,
            )
        if need_expected and ev.expected is None:
            raise DataError(
                "row has no expected answer (a last assistant turn, or one of: " + ", ".join(EXPECTED_KEYS) + ")",
                path=str(path),
                line=ev.line,
            )
    if limit is not None and limit > 0:
        out = out[:limit]
    return out


def _records_via_formats(path: Path, registries: Any) -> list[tuple[int, Any]]:
    """Rows of files only the data layer reads (plain text, Parquet, folders)."""
    if not path.exists():
        raise DataError("file not found", path=str(path))
    from tunesmith.core.data import load_records

    records = load_records(path, registries=registries)
    if not records:
        raise DataError("the file is empty: an evaluation set needs at least one row", path=str(path))
    return [(i + 1, r) for i, r in enumerate(records)]


def _convert_with_formats(path: Path, registries: Any) -> list[dict] | None:
    """Canonical records through the data engineer's format plugins, when available."""
    try:
        from tunesmith.core.data import load_records  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return load_records(path, registries=registries)
    except Exception:  # noqa: BLE001 - we report the row we could not read ourselves
        return None


# --------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[dict], *, chat_template: bool = True) -> str:
    """The text a model continues: the chat template with the generation prompt."""
    if chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(parts) + "\nassistant: "


def render_for_loss(
    tokenizer: Any, row: EvalRow, *, max_length: int, completion_only: bool = True, chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row; labels are -100 outside the scored tokens.

    The same rendering training uses (:mod:`tunesmith.core.render`): with
    ``completion_only`` only the assistant turns and their end-of-turn token are
    scored; a text row scores every token (with EOS appended).
    """
    from tunesmith.core.render import render_chat, render_text

    if row.text is not None and row.prompt is None:
        enc = render_text(tokenizer, row.text, max_length=max_length)
        return list(enc["input_ids"]), list(enc["labels"])
    if chat_template and has_chat_template(tokenizer):
        enc = render_chat(tokenizer, row.messages or [], max_length=max_length, completion_only=completion_only)
        return list(enc["input_ids"]), list(enc["labels"])
    prompt = render_prompt(tokenizer, row.prompt or [], chat_template=False)
    answer = (row.expected or "") + (tokenizer.eos_token or "")
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    a_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    ids = (p_ids + a_ids)[:max_length]
    labels = ([-100] * len(p_ids) if completion_only else p_ids) + a_ids
    return ids, labels[:max_length]


# --------------------------------------------------------------------------- token losses
def token_loss_sums(
    model: Any,
    tokenizer: Any,
    rows: list[EvalRow],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    completion_only: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int, list[tuple[float, int]]]:
    """Sum of token negative log-likelihoods over the label mask, and the token count.

    Returns ``(total_nll, total_tokens, per_row)`` with ``per_row`` the (nll, tokens)
    of each row. Batches are right-padded; padding never counts.
    """
    import torch

    encoded = [render_for_loss(tokenizer, r, max_length=max_length, completion_only=completion_only) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    per_row: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    # longest first keeps padding small; the order of the sums does not matter
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                labels = torch.full((len(idx), width), -100, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for b, i in enumerate(idx):
                    x, y = encoded[i]
                    ids[b, : len(x)] = torch.tensor(x)
                    labels[b, : len(y)] = torch.tensor(y)
                    mask[b, : len(x)] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                valid = shifted_labels(labels).ne(IGNORE_INDEX)
                # the output head only where a token is scored (tunesmith.core.labelled)
                got = labelled_forward(model, {"input_ids": ids, "attention_mask": mask}, labels)
                if got is None:
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
                    got = logits[valid], shifted_labels(labels)[valid]
                scored_logits, targets = got
                nll = torch.nn.functional.cross_entropy(scored_logits.float(), targets, reduction="none")
                rows_of = valid.nonzero()[:, 0]
                sums = torch.zeros(len(idx), dtype=nll.dtype, device=nll.device).index_add_(0, rows_of, nll).tolist()
                counts = valid.sum(dim=1).tolist()
                for b, i in enumerate(idx):
                    per_row[i] = (float(sums[b]), int(counts[b]))
                if progress:
                    progress(len(idx))
    finally:
        if was_training:
            model.train()
    total = sum(s for s, _ in per_row)
    count = sum(c for _, c in per_row)
    return total, count, per_row


def score_rows(model: Any, tokenizer: Any, rows: list[EvalRow], options: Any, desc: str) -> tuple[float, int, list[tuple[float, int]]]:
    """:func:`token_loss_sums` behind a progress bar, configured by an evaluator's
    options (``batch_size``, ``max_length``, ``completion_only``, ``progress``)."""
    bar = progress_bar(len(rows), desc, options.progress)
    try:
        return token_loss_sums(
            model,
            tokenizer,
            rows,
            batch_size=options.batch_size,
            max_length=options.max_length,
            completion_only=options.completion_only,
            progress=bar.update,
        )
    finally:
        bar.close()


def perplexity_from(total_nll: float, tokens: int) -> float:
    """exp(sum of token losses / number of scored tokens)."""
    if tokens <= 0:
        return float("nan")
    return math.exp(total_nll / tokens)


# --------------------------------------------------------------------------- generation
@dataclass
class Generation:
    text: str
    new_tokens: int
    latency_s: float
    batch: int = 0  # index of the generate call that produced it


def generate(
    model: Any,
    tokenizer: Any,
    rows: list[EvalRow],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 1,
    chat_template: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy decoding of each row's prompt.

    Prompts are batched ``batch_size`` at a time, left-padded, in order of their
    token length (so a batch holds prompts of similar length and little padding);
    the results come back in the rows' order. In fp32 a batched run gives the
    same answers as one prompt at a time (tests/evaluation/test_batched_generation.py).
    ``latency_s`` is the wall time of the ``generate`` call that produced the row
    (with ``batch_size`` 1, the latency of that request alone).
    """
    import torch

    prompts = [render_prompt(tokenizer, r.prompt or [], chat_template=chat_template) for r in rows]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    eos = tokenizer.eos_token_id
    stops = [] if eos is None else [eos]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if t not in stops:
            stops.append(t)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    old_side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "left"
    out: list[Generation] = [Generation("", 0, 0.0)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=stops or None,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            dt = time.perf_counter() - t0
            new = gen[:, enc["input_ids"].shape[1] :]
            for b, i in enumerate(chunk):
                toks = new[b].tolist()
                n = len(toks)
                hits = [toks.index(t) for t in stops if t in toks]
                if hits:
                    n = min(hits) + 1  # the stop token was generated too
                text = tokenizer.decode(toks[:n], skip_special_tokens=True).strip()
                out[i] = Generation(text=text, new_tokens=n, latency_s=dt, batch=start)
            if progress:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return out


# --------------------------------------------------------------------------- progress
def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="row")


def iter_batches(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def resolve_eval_path(path: str | None, split: str, context: Any, evaluator: str) -> Path:
    """The file an evaluator reads: its ``path`` option, else the run's split file.

    ``split`` is ``validation`` or ``test``; the config's ``data.<split>_path`` wins
    over ``<run dir>/data/<split>.jsonl``.
    """
    from tunesmith.core.errors import ConfigError

    cfg = getattr(context, "config", None)
    if path:
        p = Path(path).expanduser()
        if not p.is_absolute() and cfg is not None:
            p = cfg.resolve_path(p)
        return p
    candidates: list[Path] = []
    if cfg is not None:
        explicit = getattr(cfg.data, f"{split}_path", None)
        if explicit:
            return cfg.resolve_path(explicit)
    run_dir = getattr(context, "run_dir", None)
    if run_dir is not None:
        candidates += [Path(run_dir) / "data" / f"{split}.jsonl"]
        other = "test" if split == "validation" else "validation"
        candidates += [Path(run_dir) / "data" / f"{other}.jsonl"]
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(
        f"the {evaluator} evaluator has no data: give it a 'path' or split the data first "
        f"(tunesmith data split), which writes <run dir>/data/{split}.jsonl",
        key="evaluation",
    )
