"""Elastic Weight Consolidation: a penalty that keeps weights important to an earlier task.

``penalty = sum_i F_i (theta_i - theta*_i)^2`` over the trainable parameters, where

* ``theta*`` (the anchor) is the trainable parameters' values at the start of
  training, or those saved by a previous run (``anchor: runs/task-a``: its adapter
  or full model) for sequential tasks;
* ``F`` is the diagonal empirical Fisher information,
  ``F_i = mean over N batches of (d loss / d theta_i)^2``, with the causal-LM loss
  on a reference data set (``data:``; by default the previous run's training split
  ``data/train.jsonl`` when ``anchor`` is a run directory).

``lambda`` is the loss's ``weight`` in the config (the guide uses 1000):
``losses: [{name: causal_lm}, {name: ewc, weight: 1000, data: task_a.jsonl}]``.

The Fisher and the anchor are written as safetensors to ``RUN/ewc/`` (with
``meta.json``); a resumed run reads them back instead of estimating them again,
so the anchor stays the values at the start of the *first* attempt.

Works with full fine-tuning and with PEFT methods (the trainable parameters are
the adapter's; QLoRA's 4-bit base weights are frozen and take no part).
This module also holds the anchor helpers ``l2_sp`` uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

log = logging.getLogger("tunesmith.losses.ewc")


# --------------------------------------------------------------------------- parameters and anchors
def unwrap(model: Any) -> Any:
    """The model inside a DDP/DataParallel wrapper."""
    inner = getattr(model, "module", None)
    return inner if inner is not None and type(model).__name__ in {"DistributedDataParallel", "DataParallel"} else model


def trainable_parameters(model: Any) -> dict[str, Any]:
    """``{name: parameter}`` of every trainable parameter, names as in ``named_parameters``."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def _adapter_names(model: Any) -> list[str]:
    cfg = getattr(unwrap(model), "peft_config", None)
    return list(cfg) if isinstance(cfg, dict) else []


def saved_key(name: str, adapter_names: Iterable[str]) -> str:
    """The key a parameter has in a saved PEFT adapter file (PEFT drops the adapter name)."""
    for a in adapter_names:
        name = name.replace(f".{a}.", ".")
        if name.endswith(f".{a}"):
            name = name[: -len(a) - 1]
    return name


def _weights_files(path: Path) -> list[Path]:
    """The safetensors files of a run dir, final/ dir, adapter folder or model folder (or a file)."""
    if path.is_file():
        return [path]
    for folder in (path / "final", path):
        if (folder / "adapter_model.safetensors").exists():
            return [folder / "adapter_model.safetensors"]
        files = sorted(folder.glob("model*.safetensors"))
        if files:
            return files
    return []


def load_anchor_from(path: str | Path, model: Any) -> dict[str, Any]:
    """Anchor values for the model's trainable parameters, read from a previous run's weights.

    Accepts a run directory, its ``final/``, a PEFT adapter folder, a full model
    folder or a ``.safetensors`` file. Every trainable parameter must be found
    with the same shape, else a ConfigError says which one is missing.
    """
    import torch
    from safetensors import safe_open

    from tunesmith.core.errors import ConfigError

    p = Path(path)
    files = _weights_files(p)
    if not files:
        raise ConfigError(f"no adapter_model.safetensors or model*.safetensors under {p}", key="losses.anchor")
    available: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                available[k] = (f, k)
    params = trainable_parameters(model)
    adapters = _adapter_names(model)
    out: dict[str, Any] = {}
    missing = []
    for name, param in params.items():
        candidates = [saved_key(name, adapters), name]
        if name.startswith("base_model.model."):
            candidates.append(name[len("base_model.model.") :])
        hit = next((available[c] for c in candidates if c in available), None)
        if hit is None:
            missing.append(name)
            continue
        with safe_open(str(hit[0]), framework="pt") as fh:
            t = fh.get_tensor(hit[1])
        if tuple(t.shape) != tuple(param.shape):
            raise ConfigError(
                f"anchor {hit[0]}: '{hit[1]}' has shape {tuple(t.shape)}, the model's parameter {tuple(param.shape)}",
                key="losses.anchor",
            )
        out[name] = t.detach().to(dtype=torch.float32).contiguous()
    if missing:
        raise ConfigError(
            f"anchor {p} lacks {len(missing)} trainable parameter(s), e.g. '{missing[0]}' "
            "(was it trained with the same PEFT method and target modules?)",
            key="losses.anchor",
        )
    return out


def snapshot(model: Any) -> dict[str, Any]:
    """The trainable parameters' current values (fp32 copies, on the CPU)."""
    import torch

    return {n: p.detach().to("cpu", dtype=torch.float32).clone().contiguous() for n, p in trainable_parameters(model).items()}


def copy_into(model: Any, values: dict[str, Any]) -> None:
    """Write ``values`` into the model's trainable parameters (in place)."""
    import torch

    params = trainable_parameters(model)
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v.to(device=params[n].device, dtype=params[n].dtype))


def state_dir(context: Any, loss_name: str) -> Path | None:
    run_dir = getattr(context, "run_dir", None)
    return Path(run_dir) / loss_name if run_dir is not None else None


def is_resume(context: Any) -> bool:
    """Whether this run continues from a checkpoint: ``context.state["resume"]`` when the
    trainer sets it, else whether the run directory holds a complete checkpoint (a fresh
    run clears old checkpoints before the losses are set up)."""
    state = getattr(context, "state", None) or {}
    if "resume" in state:
        return bool(state["resume"])
    run_dir = getattr(context, "run_dir", None)
    if run_dir is None:
        return False
    from tunesmith.core.training import last_checkpoint

    return last_checkpoint(run_dir) is not None


def resolve_anchor_path(anchor: str, context: Any) -> Path:
    cfg = getattr(context, "config", None)
    return Path(cfg.resolve_path(anchor)) if cfg is not None and hasattr(cfg, "resolve_path") else Path(anchor)


def save_tensors(path: Path, tensors: dict[str, Any], metadata: dict | None = None) -> None:
    """safetensors, written atomically."""
    from safetensors.torch import save

    from tunesmith.core.io import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def prepare_anchor(model: Any, anchor: str, init_from_anchor: bool, context: Any) -> dict[str, Any]:
    """The anchor values (fp32, CPU): a snapshot at the start, or a previous run's weights
    (copied into the model first when ``init_from_anchor``)."""
    if anchor == "start":
        return snapshot(model)
    values = load_anchor_from(resolve_anchor_path(anchor, context), model)
    if init_from_anchor:
        copy_into(model, values)
    return values


# --------------------------------------------------------------------------- Fisher
def causal_lm_loss(model: Any, batch: dict) -> Any:
    """Mean cross entropy over the tokens whose label is not -100."""
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    T = batch["input_ids"].shape[1]
    logits = out.logits[:, -T:][:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def estimate_fisher(model: Any, batches: Iterable[dict], loss_fn: Any = causal_lm_loss) -> dict[str, Any]:
    """Diagonal empirical Fisher: the mean over batches of the squared gradient of the batch loss.

    ``model`` is put in eval mode (no dropout) for the estimate and restored after;
    its gradients are cleared. Returns fp32 CPU tensors keyed like
    :func:`trainable_parameters`.
    """
    import torch

    m = unwrap(model)
    params = trainable_parameters(m)
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    was_training = m.training
    m.eval()
    count = 0
    try:
        for batch in batches:
            m.zero_grad(set_to_none=True)
            loss = loss_fn(m, batch)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().to("cpu", dtype=torch.float32) ** 2
            count += 1
    finally:
        m.zero_grad(set_to_none=True)
        m.train(was_training)
    if count == 0:
        from tunesmith.core.errors import DataError

        raise DataError("EWC: the reference data gave no batch to estimate the Fisher information on")
    return {n: f / count for n, f in fisher.items()}


def ewc_penalty(model: Any, fisher: dict[str, Any], anchor: dict[str, Any]) -> Any:
    """``sum_i F_i (theta_i - theta*_i)^2`` over the parameters present in ``fisher``."""
    import torch

    params = trainable_parameters(model)
    total = None
    for n, f in fisher.items():
        p = params[n]
        if f.device != p.device:
            f = fisher[n] = f.to(p.device)
        a = anchor[n]
        if a.device != p.device:
            a = anchor[n] = a.to(p.device)
        term = (f * (p.float() - a) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        total = torch.zeros((), requires_grad=False)
    return total


def reference_batches(
    records: list[dict], tokenizer: Any, *, batch_size: int, max_length: int, num_batches: int, device: Any = None
) -> Iterator[dict]:
    """Token batches (input_ids, attention_mask, labels) from canonical records.

    Chat records are rendered with the chat template (loss on the assistant
    turns), preference pairs as prompt + chosen, raw text as plain text.
    """
    import torch

    from tunesmith.core.render import render_chat, render_text

    rows = []
    for rec in records:
        if "messages" in rec:
            r = render_chat(tokenizer, rec["messages"], max_length=max_length, completion_only=True)
        elif "chosen" in rec:
            r = render_chat(tokenizer, list(rec.get("prompt") or []) + list(rec["chosen"]), max_length=max_length, completion_only=True)
        else:
            r = render_text(tokenizer, rec["text"], max_length=max_length)
        if any(l != -100 for l in r["labels"][1:]):
            rows.append(r)
        if len(rows) >= batch_size * num_batches:
            break
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            mask[j, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        yield batch


# --------------------------------------------------------------------------- the plugin
class EWCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None,
        description="Reference data for the Fisher information (the earlier task's data); "
        "default: ANCHOR_RUN/data/train.jsonl when anchor is a run directory.",
    )
    format: str = Field("auto", description="Data format of the reference data.")
    batches: int = Field(16, ge=1, description="How many batches the Fisher information is averaged over.")
    batch_size: int = Field(4, ge=1, description="Examples per Fisher batch (1 gives the per-example empirical Fisher).")
    max_length: int | None = Field(None, ge=8, description="Token limit of the reference examples (default training.max_length).")
    anchor: str = Field(
        "start",
        description="start = the trainable parameters at the start of training; or a previous run "
        "directory / adapter / model folder whose weights are the anchor (sequential tasks).",
    )
    init_from_anchor: bool = Field(
        True, description="With a previous run as anchor, start training from its weights (continue that adapter)."
    )
    normalize: bool = Field(False, description="Divide the Fisher by its largest value (lambda then needs no rescaling per model).")


class EWC:
    name = "ewc"
    description = "Elastic Weight Consolidation: lambda * sum F_i (theta_i - theta*_i)^2 with a diagonal Fisher from reference data."
    requires = None
    Options = EWCOptions

    def _data_path(self, options: EWCOptions, context: Any) -> Path:
        from tunesmith.core.errors import ConfigError

        cfg = getattr(context, "config", None)
        if options.data:
            return Path(cfg.resolve_path(options.data)) if cfg is not None else Path(options.data)
        if options.anchor != "start":
            run = resolve_anchor_path(options.anchor, context)
            cand = run / "data" / "train.jsonl"
            if cand.exists():
                return cand
        raise ConfigError(
            "ewc needs reference data for the Fisher information: set 'data' (the earlier task's data) "
            "or an 'anchor' run directory that has data/train.jsonl",
            key="losses.ewc.data",
        )

    def setup(self, model: Any, options: EWCOptions, context: Any) -> None:
        from tunesmith.core.errors import ConfigError

        if not trainable_parameters(model):
            raise ConfigError("ewc: the model has no trainable parameters", key="losses")
        folder = state_dir(context, "ewc")
        fisher_file = folder / "fisher.safetensors" if folder else None
        anchor_file = folder / "anchor.safetensors" if folder else None
        meta_file = folder / "meta.json" if folder else None
        names = sorted(trainable_parameters(model))
        if fisher_file and is_resume(context) and fisher_file.exists() and anchor_file.exists():
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
            fisher, anchor = load_tensors(fisher_file), load_tensors(anchor_file)
            if sorted(fisher) == names and sorted(anchor) == names:
                log.info("ewc: reusing the Fisher information and anchor from %s", folder)
                self._store(context, fisher, anchor, meta)
                return
            log.warning("ewc: %s does not match the model's trainable parameters; estimating again", folder)

        anchor = prepare_anchor(model, options.anchor, options.init_from_anchor, context)
        data_path = self._data_path(options, context)
        from tunesmith.core.data import load_records

        records = load_records(data_path, format=options.format, registries=getattr(context, "registries", None))
        cfg = getattr(context, "config", None)
        max_length = options.max_length or (cfg.training.max_length if cfg is not None else 512)
        tokenizer = getattr(context, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("ewc: no tokenizer in the run context to render the reference data", key="losses")
        device = next(unwrap(model).parameters()).device
        batches = reference_batches(
            records, tokenizer, batch_size=options.batch_size, max_length=max_length, num_batches=options.batches, device=device
        )
        fisher = estimate_fisher(model, _progress(batches, options.batches))
        top = max((float(f.max()) for f in fisher.values() if f.numel()), default=0.0)
        if options.normalize and top > 0:
            fisher = {n: f / top for n, f in fisher.items()}
        meta = {
            "data": str(data_path),
            "batches": options.batches,
            "batch_size": options.batch_size,
            "max_length": max_length,
            "anchor": options.anchor,
            "normalize": options.normalize,
            "fisher_max": top,
            "fisher_mean": float(sum(float(f.sum()) for f in fisher.values()) / max(1, sum(f.numel() for f in fisher.values()))),
            "parameters": len(fisher),
        }
        if folder is not None:
            save_tensors(fisher_file, fisher, {"kind": "ewc-fisher"})
            save_tensors(anchor_file, anchor, {"kind": "ewc-anchor"})
            from tunesmith.core.io import atomic_write_json

            atomic_write_json(meta_file, meta)
        self._store(context, fisher, anchor, meta)

    def _store(self, context: Any, fisher: dict, anchor: dict, meta: dict) -> None:
        state = context.state if context is not None else {}
        state["ewc"] = {"fisher": fisher, "anchor": anchor, "meta": meta}

    def compute(self, model: Any, batch: Any, options: EWCOptions, context: Any) -> tuple[Any, dict]:
        state = context.state if context is not None else {}
        if "ewc" not in state:
            self.setup(model, options, context)
        st = state["ewc"]
        return ewc_penalty(model, st["fisher"], st["anchor"]), {}


def _progress(batches: Iterator[dict], total: int) -> Iterator[dict]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches
    return tqdm(batches, total=total, desc="ewc: Fisher information", leave=False)


@hookimpl
def register_losses(register: Any) -> None:
    register(EWC())
