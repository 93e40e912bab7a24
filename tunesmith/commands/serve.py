"""``tunesmith serve --base MODEL --adapter NAME=PATH ... [--engine NAME]``.

The engine (a ``register_serving_engines`` plugin) decides who answers: the built-in
in-process ``transformers`` server, or a hand-off to ``vllm`` / ``llamacpp``. Engine
options come from the flags below (each only where the engine has that option) and
from ``--opt KEY=VALUE``; the engine's ``Options`` model validates them.
"""

from __future__ import annotations

import shlex
from typing import Any

import click

#: flag -> the engine option it sets (None: not given, the engine's default applies)
ENGINE_FLAGS = ("mode", "max_batch_size", "max_wait_ms", "max_queue", "max_tokens_limit", "dtype", "device", "max_lora_rank")


@click.command("serve")
@click.option("--base", default="default", show_default=True,
              help="Base model: a model folder, a .gguf file or a model source name.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="An adapter to serve (adapter folder, run directory, or GGUF LoRA file for llamacpp; repeatable).")
@click.option("--engine", default="transformers", show_default=True,
              help="Serving engine: transformers (in-process), vllm, llamacpp, or a plugin's.")
@click.option("--registry", "registry_path", type=click.Path(file_okay=False),
              help="Serve this registry's production version as model 'production', canary share routed to the canary.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="TUNESMITH_API_KEY", help="Require 'Authorization: Bearer KEY' (or $TUNESMITH_API_KEY).")
@click.option("--mode", type=click.Choice(["batched", "serial"]),
              help="transformers: batched (continuous batching across adapters, default) or serial (one at a time).")
@click.option("--max-batch-size", type=int, help="transformers: most sequences in one forward (default 32).")
@click.option("--max-wait-ms", type=float, help="transformers: when idle, wait this long for requests to batch with (default 5).")
@click.option("--max-queue", type=int, help="transformers: most waiting sequences before 429 + Retry-After (default 256).")
@click.option("--max-tokens-limit", type=int, help="transformers: largest max_tokens a request may ask for (default 2048).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype (default: the engine's).")
@click.option("--device", help="transformers: auto (default), cpu, cuda, cuda:1, ...")
@click.option("--max-lora-rank", type=int, help="vllm: --max-lora-rank (default: the smallest value that fits every adapter).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="Any engine option, e.g. --opt max_prefill_tokens=2048 (values are YAML; repeatable).")
@click.option("--dry-run", is_flag=True, help="Check the adapters and print what would run, then exit.")
@click.option("--log-level", default="info", show_default=True)
@click.pass_context
def command(ctx: click.Context, base: str, adapters: tuple, engine: str, registry_path: "str | None", host: str, port: int,
            api_key: "str | None", opts: tuple, dry_run: bool, log_level: str, **flags: Any) -> None:
    """Serve one base model with several LoRA adapters (OpenAI-compatible).

    Endpoints of the built-in engine: /v1/chat/completions and /v1/completions
    (``model`` picks an adapter by name, or ``base``), /v1/models, /health,
    /metrics (Prometheus), and POST/DELETE /v1/adapters to load and unload adapters
    while running. ``--engine vllm`` / ``--engine llamacpp`` check every adapter
    against that server's limits and start it (``--dry-run`` prints the command).
    """
    import json

    import yaml
    from pydantic import ValidationError

    from tunesmith.cli import get_state
    from tunesmith.core.registry import member
    from tunesmith.serving.spec import ServeSpec

    parsed: dict[str, str] = {}
    for item in adapters:
        if "=" not in item:
            raise click.BadParameter(f"expected NAME=PATH, got '{item}'", param_hint="--adapter")
        name, path = (x.strip() for x in item.split("=", 1))
        if name in parsed:
            raise click.BadParameter(f"adapter '{name}' given twice", param_hint="--adapter")
        parsed[name] = path
    registries = get_state(ctx).registries()
    eng = registries.serving_engines.get(engine)

    values: dict[str, Any] = {k: v for k, v in flags.items() if k in ENGINE_FLAGS and v is not None}
    for item in opts:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got '{item}'", param_hint="--opt")
        key, raw = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    options_cls = getattr(eng, "Options", None)
    if options_cls is None:
        if values:
            raise click.UsageError(f"the {engine} engine takes no options (got {', '.join(sorted(values))})")
        options = None
    else:
        try:
            options = options_cls.model_validate(values)
        except ValidationError as exc:
            lines = []
            for e in exc.errors():
                key = ".".join(str(p) for p in e["loc"])
                flag = f"--{key.replace('_', '-')}" if key in ENGINE_FLAGS else f"--opt {key}"
                if e["type"] == "extra_forbidden":
                    known = ", ".join(sorted(options_cls.model_fields))
                    lines.append(f"{flag}: the {engine} engine has no option '{key}' (its options: {known})")
                else:
                    lines.append(f"{flag}: {str(e['msg']).removeprefix('Value error, ')}")
            raise click.UsageError("; ".join(lines)) from None

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    spec = ServeSpec(base=base, adapters=parsed, host=host, port=port, api_key=api_key, registry=registry_path,
                     log_level=log_level, registries=registries)

    check = member(eng, "serving_engines", "check")
    problems = list(check(spec, options)) if check is not None else []
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        raise click.exceptions.Exit(2)
    if dry_run:
        build = member(eng, "serving_engines", "command")
        if build is not None:
            click.echo(shlex.join(build(spec, options)))
            if api_key:
                click.echo("note: the API key is handed to the server in its environment, not on its command line", err=True)
        else:
            plan = {"engine": engine, **spec.public(),
                    "options": options.model_dump() if options is not None else None}
            click.echo(json.dumps(plan, indent=2))
        return
    eng.serve(spec, options)
