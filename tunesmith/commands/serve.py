"""``tunesmith serve --base MODEL --adapter NAME=PATH ...``: an OpenAI-compatible server."""

import click


@click.command("serve")
@click.option("--base", default="default", show_default=True,
              help="Base model: a model folder, a .gguf file or a model source name.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A LoRA adapter to load at start (adapter folder or run directory; repeatable).")
@click.option("--registry", "registry_path", type=click.Path(file_okay=False),
              help="Serve this registry's production version as model 'production', canary share routed to the canary.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="TUNESMITH_API_KEY", help="Require 'Authorization: Bearer KEY' (or $TUNESMITH_API_KEY).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--max-tokens-limit", default=2048, show_default=True, type=int, help="Largest max_tokens a request may ask for.")
@click.option("--log-level", default="info", show_default=True)
@click.pass_context
def command(ctx: click.Context, base: str, adapters: tuple, registry_path: "str | None", host: str, port: int,
            api_key: "str | None", dtype: str, max_tokens_limit: int, log_level: str) -> None:
    """Serve one base model with several LoRA adapters (OpenAI-compatible).

    Endpoints: /v1/chat/completions and /v1/completions (``model`` picks an
    adapter by name, or ``base``), /v1/models, /health, and POST/DELETE
    /v1/adapters to load and unload adapters while running.
    """
    from tunesmith.cli import get_state
    from tunesmith.serving.server import ModelServer, create_app, serve

    parsed = {}
    for item in adapters:
        if "=" not in item:
            raise click.BadParameter(f"expected NAME=PATH, got '{item}'", param_hint="--adapter")
        name, path = item.split("=", 1)
        parsed[name.strip()] = path.strip()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    server = ModelServer.from_paths(base, parsed, dtype=dtype, registries=get_state(ctx).registries(),
                                    registry=registry_path, max_tokens_limit=max_tokens_limit)
    click.echo(f"serving {', '.join(server.names())} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    serve(create_app(server, api_key=api_key), host=host, port=port, log_level=log_level)
