"""``tunesmith registry list|show|register|promote|rollback|route|path``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import click

from tunesmith.commands._common import echo_json, json_option


def store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """-r DIR, --backend NAME, --option KEY=VALUE: which registry, through which back-end."""

    @click.option(
        "-r", "--registry", "-o", "--output", "registry_path", type=click.Path(file_okay=False),
        default=lambda: os.environ.get("TUNESMITH_REGISTRY", "registry"), show_default="$TUNESMITH_REGISTRY or ./registry",
        help="The registry folder (local: holds versions.json; mlflow: the default sqlite store and model name).",
    )
    @click.option(
        "--backend", default=lambda: os.environ.get("TUNESMITH_REGISTRY_BACKEND", "local"),
        show_default="$TUNESMITH_REGISTRY_BACKEND or local",
        help="Registry back-end plugin: local (versions.json) or mlflow (MLflow Model Registry).",
    )
    @click.option(
        "--option", "backend_options", multiple=True, metavar="KEY=VALUE",
        help="A back-end option (repeatable), e.g. --option tracking_uri=http://127.0.0.1:5000 --option model_name=router.",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, registry_path: str, backend: str, backend_options: tuple[str, ...], **kwargs: Any) -> Any:
        return f(*args, store=_Store(registry_path, backend, backend_options), **kwargs)

    return wrapper


class _Store:
    """The registry a command works on, opened on first use."""

    def __init__(self, path: str, backend: str, options: tuple[str, ...]) -> None:
        self.path, self.backend, self.options = path, backend, options
        self._reg: Any = None

    def open(self) -> Any:
        if self._reg is None:
            from tunesmith.cli import get_state
            from tunesmith.model_registry import open_registry

            self._reg = open_registry(self.path, self.backend, _kv(self.options, "--option", numbers=False),
                                      registries=get_state().registries())
        return self._reg


@click.group("registry")
def command() -> None:
    """Version trained models and roll them out: registered, canary, staging, production, archived."""


@command.command("list")
@store_options
@click.option("--stage", help="Only versions in this stage.")
@json_option
def list_(store: _Store, stage: str | None, as_json: bool) -> None:
    """List versions, their stage and traffic share."""
    reg = store.open()
    data = reg.load()
    versions = [v for v in data["versions"] if stage is None or v["stage"] == stage]
    traffic = reg._traffic(data)
    if as_json:
        echo_json({"registry": reg.location, "backend": store.backend, "production": data["production"], "canary": data["canary"],
                   "staging": data["staging"], "shares": data["shares"], "traffic": traffic, "versions": versions})
        return
    if not versions:
        click.echo(f"{reg.location}: no versions")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=reg.location, title_justify="left")
    for col in ("version", "stage", "traffic", "created", "artefacts", "metrics"):
        table.add_column(col, overflow="fold")
    for v in versions:
        share = traffic.get(v["version"])
        metrics = ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in list(v["metrics"].items())[:4])
        table.add_row(v["version"] + (" *" if v["version"] == data["production"] else ""), v["stage"],
                      f"{share:.0%}" if share is not None else "", v["created_at"][:19], ", ".join(v["artifacts"]), metrics)
    Console().print(table)


@command.command("show")
@click.argument("version", required=False)
@store_options
@json_option
def show(version: str | None, store: _Store, as_json: bool) -> None:
    """Show one version (default: the production version)."""
    from tunesmith.model_registry.state import RegistryError

    reg = store.open()
    entry = reg.get(version) if version else reg.production()
    if entry is None:
        raise RegistryError("no production version", hint="name a version: tunesmith registry show VERSION")
    if as_json:
        echo_json(entry)
        return
    click.echo(f"version:     {entry['version']}")
    click.echo(f"stage:       {entry['stage']}")
    click.echo(f"created:     {entry['created_at']}")
    click.echo(f"base model:  {entry.get('base_model')}")
    click.echo(f"config hash: {entry.get('config_hash')}")
    for k, p in entry["artifacts"].items():
        click.echo(f"artefact:    {k}: {p}")
    for k, val in entry["metrics"].items():
        click.echo(f"metric:      {k} = {val}")
    for k, val in entry["metadata"].items():
        click.echo(f"metadata:    {k} = {val}")
    for h in entry["history"]:
        click.echo(f"history:     {h['at'][:19]} {h['stage']}" + (f" ({h['reason']})" if h.get("reason") else ""))


def _kv(items: tuple[str, ...], what: str, numbers: bool) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got '{item}'", param_hint=what)
        k, v = item.split("=", 1)
        val = yaml.safe_load(v) if v.strip() else ""
        if numbers and not isinstance(val, (int, float)):
            raise click.BadParameter(f"metric '{k}' must be a number, got '{v}'", param_hint=what)
        out[k] = val
    return out


@command.command("register")
@click.argument("path", type=click.Path())
@store_options
@click.option("--version", "version", help="Version name (default: the next vN).")
@click.option("--artifact", "artifacts", multiple=True, metavar="KIND=PATH", help="Extra artefacts (repeatable).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=NUMBER", help="A metric (repeatable).")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--base-model", help="The base model (default: from the run).")
@click.option("--config-hash", help="Hash of the config that trained it (default: from the run).")
@click.option("--stage", default="registered", show_default=True, help="Stage to put it in right away.")
@json_option
def register(path: str, store: _Store, version: str | None, artifacts: tuple[str, ...], metrics: tuple[str, ...],
             meta: tuple[str, ...], base_model: str | None, config_hash: str | None, stage: str, as_json: bool) -> None:
    """Register PATH: a run directory (its exports, metrics and config hash are read) or an artefact."""
    from tunesmith.model_registry.state import guess_kind as _guess_kind, run_metadata

    p = Path(path)
    if p.is_dir() and ((p / "final").is_dir() or (p / "exports").is_dir()):
        info = run_metadata(p)
    else:
        info = {"artifacts": {_guess_kind(p): str(p)}, "metrics": {}, "metadata": {}, "config_hash": None, "base_model": None}
    arts = dict(info["artifacts"])
    arts.update(_kv(artifacts, "--artifact", numbers=False))
    entry = store.open().register(
        arts,
        version=version,
        metrics={**info["metrics"], **_kv(metrics, "--metric", numbers=True)},
        config_hash=config_hash or info["config_hash"],
        base_model=base_model or info["base_model"],
        metadata={**info["metadata"], **_kv(meta, "--meta", numbers=False)},
        stage=stage,
    )
    if as_json:
        echo_json(entry)
    else:
        click.echo(f"registered {entry['version']} ({entry['stage']}): " + ", ".join(entry["artifacts"]))


@command.command("promote")
@click.argument("version")
@click.argument("stage", type=click.Choice(["registered", "canary", "staging", "production", "archived"]))
@store_options
@click.option("--share", type=float, help="Traffic share for canary/staging (0-1; defaults 0.05 and 0.10).")
@click.option("--reason", help="Why (kept in the history).")
@json_option
def promote(version: str, stage: str, store: _Store, share: float | None, reason: str | None, as_json: bool) -> None:
    """Move VERSION to STAGE (production makes it the current version)."""
    entry = store.open().promote(version, stage, share=share, reason=reason)
    if as_json:
        echo_json(entry)
    else:
        click.echo(f"{entry['version']} -> {entry['stage']}")


@command.command("rollback")
@store_options
@click.option("--to", "to", help="Version to return to (default: the previous production version).")
@click.option("--reason", help="Why (kept in the history).")
@json_option
def rollback(store: _Store, to: str | None, reason: str | None, as_json: bool) -> None:
    """Return production to the previous production version."""
    entry = store.open().rollback(to=to, reason=reason)
    if as_json:
        echo_json(entry)
    else:
        click.echo(f"production is now {entry['version']}")


@command.command("route")
@click.argument("request_ids", nargs=-1, required=True)
@store_options
@json_option
def route(request_ids: tuple[str, ...], store: _Store, as_json: bool) -> None:
    """Which version serves each request id (MD5 bucket against the traffic shares)."""
    reg = store.open()
    data = reg.load()
    out = {rid: reg.route_in(data, rid) for rid in request_ids}
    if as_json:
        echo_json(out)
    else:
        for rid, v in out.items():
            click.echo(f"{rid}: {v}")


@command.command("path")
@click.option("--kind", help="Which artefact (adapter, merged, gguf-q8_0, ...); default: the first one.")
@store_options
@json_option
def path_(kind: str | None, store: _Store, as_json: bool) -> None:
    """Print the production version's artefact path (for scripts: serve, deploy)."""
    from tunesmith.model_registry.state import RegistryError

    reg = store.open()
    prod = reg.production()
    p = reg.current_path(kind)
    if p is None or prod is None:
        raise RegistryError(f"{reg.location}: no production version")
    if as_json:
        echo_json({"version": prod["version"], "kind": kind or next(iter(prod["artifacts"])), "path": str(p)})
    else:
        click.echo(str(p))
