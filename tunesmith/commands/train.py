"""``tunesmith train CONFIG [--resume] [--set key=value]``, and the preflight check
that ``train``, ``run`` and ``eval`` make before any model loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from tunesmith.commands._common import echo_json, json_option, load_cli_config, set_option


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the run's last complete checkpoint.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="The run directory (overrides output_dir).")
@click.option("--ray", "ray_", is_flag=True, help="Train on Ray Train workers (training.distributed.backend=ray).")
@click.option("--num-workers", type=click.IntRange(min=1), default=None,
              help="Training processes for --ray / training.distributed (training.distributed.num_workers).")
@set_option
@json_option
def command(config: str, resume: bool, output: str | None, ray_: bool, num_workers: int | None,
            overrides: tuple[str, ...], as_json: bool) -> None:
    """Fine-tune the model as CONFIG says (sft, cpt, dpo, reward, ppo, grpo).

    Writes the run directory: config.yaml, metrics.jsonl, tensorboard/, plots/loss.png,
    checkpoints/ (complete ones only) and final/ (adapter or model, tokenizer,
    tunesmith.json). Works under `torchrun --nproc_per_node=N` and `accelerate launch`;
    `--ray --num-workers N` (or training.distributed) starts the processes itself.
    """
    from tunesmith.cli import get_state
    from tunesmith.core.session import train

    from tunesmith.cli import attach_run_log
    from tunesmith.core.rundir import RunDir

    launch = (("training.distributed.backend=ray",) if ray_ else ()) + (
        (f"training.distributed.num_workers={num_workers}",) if num_workers else ())
    cfg = load_cli_config(config, launch + tuple(overrides))
    regs = get_state().registries(tuple(cfg.plugins.disable))
    if output:
        cfg.output_dir = str(Path(output).resolve())
    preflight(cfg, regs, "train")
    attach_run_log(RunDir.for_config(cfg).root)
    result = train(cfg, regs, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one line per run: rank 0 says it
    if as_json:
        echo_json(result)
    else:
        if "reward_start" in result:  # PPO / GRPO report the reward, not a loss
            progress = f"mean reward {result['reward_start']:.3f} -> {result['reward_end']:.3f}"
        else:
            progress = f"train loss {result.get('train_loss', float('nan')):.4f}"
        click.echo(
            f"done: {result.get('steps')} steps, {progress}"
            + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
            + f"; final model in {result.get('output_path')}"
        )


# --------------------------------------------------------------------------- preflight
def _line(cfg: Any, key: str) -> int | None:
    try:
        from tunesmith.core.config import read_yaml

        _, lines = read_yaml(cfg.source)
    except Exception:  # noqa: BLE001 - a config built in Python has no file
        return None
    parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    while parts and parts not in lines:
        parts = parts[:-1]
    return lines.get(parts)


def _check_file(cfg: Any, key: str, value: str | None, what: str) -> str | None:
    """Why the file at ``value`` (config-relative) cannot be read, or None."""
    if not value:
        return None
    p = cfg.resolve_path(value)
    if not p.exists():
        return f"{what} not found: {p}"
    if p.is_dir():
        return None if any(p.iterdir()) else f"{what} is an empty folder: {p}"
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return f"{what} cannot be read: {p} ({exc.strerror or exc})"
    return None


def preflight(cfg: Any, registries: Any, stage: str, *, run_dir: str | Path | None = None) -> None:
    """Check what ``stage`` (``train``, ``run``, ``eval`` or ``export``) will read before any model
    loads: the data files (unless the run already holds its prepared split), the
    evaluators' files, a local model folder or GGUF file, and the chat template.
    The first problem is raised as a ConfigError naming the config line and key."""
    from tunesmith.core.errors import ConfigError, TunesmithError
    from tunesmith.core.rundir import RunDir

    problems: list[tuple[str, str]] = []
    run = RunDir(Path(run_dir)) if run_dir else RunDir.for_config(cfg)
    prepared = (run.data_dir / "train.jsonl").exists()
    if stage in ("train", "run") and not (stage == "train" and prepared):
        if not cfg.data.path and not cfg.data.sources and not prepared:
            problems.append(("data.path", "no training data: set data.path (or data.sources)"))
        why = _check_file(cfg, "data.path", cfg.data.path, "data file")
        if why:
            problems.append(("data.path", why))
        for i, src in enumerate(cfg.data.sources or []):
            why = _check_file(cfg, f"data.sources.{i}.path", src.path, "data file")
            if why:
                problems.append((f"data.sources.{i}.path", why))
    for key in ("validation_path", "test_path") if stage != "export" else ():
        why = _check_file(cfg, f"data.{key}", getattr(cfg.data, key, None), "data file")
        if why:
            problems.append((f"data.{key}", why))
    if stage == "eval":
        problems += _evaluator_problems(cfg, registries, run)
    # a local model: its folder or file must be there (hub ids and the default resolve later)
    try:
        from tunesmith.core.models import source_options

        _src, opts = source_options(cfg.model, registries, base_dir=cfg.base_dir)
        mpath = getattr(opts, "path", None)
        if mpath and not Path(mpath).exists():
            problems.append(("model.path", f"model not found: {mpath}"))
    except TunesmithError as exc:
        problems.append(("model", str(exc)))
    if getattr(cfg, "chat_template", None):
        from tunesmith.core.templates import resolve_template

        try:
            resolve_template(str(cfg.chat_template), registries, base_dir=cfg.base_dir)
        except TunesmithError as exc:
            problems.append(("chat_template", str(exc).split(": ", 1)[-1] if isinstance(exc, ConfigError) else str(exc)))
    if problems:
        key, msg = problems[0]
        more = [f"{cfg.source}: {k}: {m}" for k, m in problems[1:]]
        raise ConfigError(msg, key=key, source=cfg.source, line=_line(cfg, key),
                          errors=[f"{cfg.source}: {key}: {msg}", *more],
                          hint="nothing was loaded; fix the path and run again")


def _evaluator_problems(cfg: Any, registries: Any, run: Any) -> list[tuple[str, str]]:
    from tunesmith.core.context import RunContext
    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.evalset import resolve_eval_path
    from tunesmith.core.evaluation import evaluator_specs

    out: list[tuple[str, str]] = []
    ctx = RunContext(config=cfg, run_dir=run.root, registries=registries)
    for i, (name, opts) in enumerate(evaluator_specs(cfg, registries)):
        fields = type(opts).model_fields if opts is not None else {}
        if "path" not in fields:
            continue
        key = f"evaluation.{i}.path" if cfg.evaluation else "evaluation"
        value = getattr(opts, "path", None)
        if value:
            why = _check_file(cfg, key, value, f"the {name} evaluator's file")
            if why:
                out.append((key, why))
        elif "split" in fields:
            try:
                p = resolve_eval_path(None, getattr(opts, "split"), ctx, name)
            except TunesmithError as exc:
                out.append((key, str(exc).split(": ", 1)[-1]))
                continue
            why = _check_file(cfg, key, str(p), f"the {name} evaluator's file")
            if why:
                out.append((key, why))
    return out
