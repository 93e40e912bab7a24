"""``tunesmith plan``: recommend an approach; estimate memory and training time."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.commands._common import echo_json, json_option


@click.group("plan")
def command() -> None:
    """Recommend prompting, RAG or fine-tuning; estimate memory and time."""


def _read_profile(path: str) -> dict:
    import yaml

    from tunesmith.core.errors import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the profile: {exc}", source=path) from None
    if not isinstance(data, dict):
        raise ConfigError("a profile is a mapping of keys", source=path)
    return data


@command.command("recommend")
@click.option("--profile", type=click.Path(exists=True, dir_okay=False), help="A YAML/JSON use-case profile.")
@click.option("--example", help="One of the built-in example profiles (support-bot, code-completion, ...).")
@click.option("--name", help="Name of the use case.")
@click.option("--data-size", type=int, help="Number of examples you have.")
@click.option("--update-frequency", type=click.Choice(["daily", "weekly", "monthly", "static"]))
@click.option("--complexity", type=click.Choice(["simple", "moderate", "complex"]))
@click.option("--latency-ms", type=float, help="Latency requirement in milliseconds.")
@click.option("--budget", "monthly_budget_usd", type=float, help="Monthly budget in USD.")
@click.option("--domain-knowledge/--no-domain-knowledge", "needs_domain_knowledge", default=None)
@click.option("--format/--no-format", "needs_format", default=None, help="Needs a specific output format.")
@click.option("--tone/--no-tone", "needs_tone", default=None, help="Needs a specific tone or house style.")
@click.option("--model-size", "model_size_b", type=float, help="Base model size in billions (prices fine-tuning).")
@json_option
def recommend_cmd(profile: str | None, example: str | None, as_json: bool, **fields: object) -> None:
    """Recommend prompting, RAG, fine-tuning or a hybrid, with the reasons.

    Example: tunesmith plan recommend --data-size 5000 --update-frequency weekly
    --complexity moderate --domain-knowledge --format --tone --budget 2000
    """
    from dataclasses import asdict, fields as dc_fields

    from tunesmith.core.errors import TunesmithError
    from tunesmith.planning import EXAMPLES, UseCase, recommend

    base: dict = {}
    if example:
        if example not in EXAMPLES:
            raise TunesmithError(f"unknown example '{example}'", hint="choose from " + ", ".join(EXAMPLES))
        base = asdict(EXAMPLES[example])
    if profile:
        data = _read_profile(profile)
        known = {f.name for f in dc_fields(UseCase)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TunesmithError(f"{profile}: unknown profile key(s) {', '.join(unknown)}", hint="valid: " + ", ".join(sorted(known)))
        base.update(data)
    base.update({k: v for k, v in fields.items() if v is not None})
    use = UseCase(**base)
    rec = recommend(use)
    if as_json:
        echo_json({"use_case": asdict(use), **rec.to_dict()})
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{use.name}[/bold]: [green]{rec.summary}[/green]")
    table = Table(show_header=True, header_style="bold")
    table.add_column("approach")
    table.add_column("score", justify="right")
    table.add_column("reasons")
    for k in ("fine-tuning", "rag", "prompting"):
        table.add_row(k, f"{rec.scores[k]:.2f}", "\n".join(rec.reasons[k]) or "-")
    console.print(table)
    if rec.budget:
        b = rec.budget
        console.print(
            f"budget: ${b['monthly_budget_usd']:,.0f}/month; a LoRA run costs about "
            f"${b['fine_tune_run_usd'] or float('inf'):,.2f} on {b['gpu']}, "
            f"x {b['fine_tune_runs_per_month']:.2g} runs/month"
        )
    console.print(f"examples needed for a {use.complexity} task: about {rec.samples_needed}")


@command.command("estimate")
@click.option("--params", "params_b", type=float, help="Model size in billions of parameters, e.g. 7.")
@click.option("--model", "model", help="Read the shape from a model folder, config.json, .gguf file or model source (default).")
@click.option("--samples", type=int, default=1000, show_default=True)
@click.option("--epochs", type=float, default=3, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--tokens-per-sample", type=int, help="Average tokens per sample (default: the sequence length).")
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--target-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help="Comma-separated module names, or all-linear.")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--utilization", type=float, default=0.4, show_default=True, help="Fraction of peak FLOP/s achieved.")
@click.option("--gpu", "gpus", multiple=True, help="Only these GPUs (repeatable).")
@json_option
def estimate_cmd(params_b: float | None, model: str | None, target_modules: str, gpus: tuple[str, ...], as_json: bool, **kw: object) -> None:
    """Estimate memory for full, LoRA and QLoRA training, and the time on each GPU.

    Example: tunesmith plan estimate --model default --samples 300 --seq-len 256
    """
    from tunesmith.core.errors import TunesmithError
    from tunesmith.planning import GPUS, estimate, model_shape

    if (params_b is None) == (model is None):
        raise TunesmithError("give exactly one of --params or --model")
    shape = None
    if model is not None:
        from tunesmith.cli import get_state

        shape = model_shape(model, registries=get_state().registries())
    tm = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    est = estimate(params_b=params_b, shape=shape, target_modules=tm, gpus=gpus or None, **kw)  # type: ignore[arg-type]
    if as_json:
        echo_json(est.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{est.model}[/bold]: {est.params / 1e9:.3f}B parameters, {est.tokens:,} training tokens "
        f"({est.settings['samples']} samples x {est.settings['epochs']:g} epochs x {est.settings['tokens_per_sample']} tokens)"
    )
    mem = Table(title="memory (GiB)", header_style="bold")
    for col in ("method", "trainable", "weights", "grads", "optimizer", "activations", "total"):
        mem.add_column(col, justify="left" if col == "method" else "right")
    for m in est.methods.values():
        g = m.memory_gb
        mem.add_row(m.method, f"{m.trainable_params:,}", f"{g['weights']:.2f}", f"{g['gradients']:.2f}", f"{g['optimizer']:.2f}",
                    f"{g['activations']:.2f}", f"{g['total']:.2f}")
    console.print(mem)
    for m in est.methods.values():
        console.print(f"{m.method} fits on: {', '.join(m.fits_on) or 'none of the known GPUs'}")
    t = Table(title=f"training time (at {est.settings['utilization']:.0%} of peak FLOP/s)", header_style="bold")
    t.add_column("GPU")
    t.add_column("TFLOP/s", justify="right")
    for name in est.methods:
        t.add_column(name, justify="right")
    for g in next(iter(est.methods.values())).per_gpu:
        cells = []
        for m in est.methods.values():
            v = m.per_gpu[g]
            cells.append(_duration(v["hours"]) + ("" if v["fits"] else " (OOM)"))
        t.add_row(g, f"{GPUS[g][1]:g}", *cells)
    console.print(t)
    gd = est.guide
    console.print(f"the guide's formulas: full {gd['full_gb']:.1f} GB, LoRA {gd['lora_gb']:.1f} GB, QLoRA {gd['qlora_gb']:.1f} GB, "
                  f"{_duration(gd['time_hours_a100'])} on an A100 (see docs/planning.md)")


def _duration(hours: float) -> str:
    s = hours * 3600
    if s < 60:
        return f"{s:.2g} s"
    if s < 3600:
        return f"{s / 60:.3g} min"
    if hours < 48:
        return f"{hours:.3g} h"
    return f"{hours / 24:.3g} days"
