"""The ``tunesmith`` command line (click).

Built-in commands live in :mod:`tunesmith.commands`, one module each, imported only
when run, so ``tunesmith --help`` stays fast. Plugins add commands through the
``register_commands`` hook.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from tunesmith import __version__

#: name -> (module, short help). Modules are imported when the command runs.
BUILTIN_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tunesmith.commands.run", "Run the whole pipeline from one config."),
    "plugins": ("tunesmith.commands.plugins", "List installed plugins by area."),
    "config": ("tunesmith.commands.config", "Validate a config or print its JSON Schema."),
    "data": ("tunesmith.commands.data", "Inspect, validate, clean, convert, split and mix data."),
    "synth": ("tunesmith.commands.synth", "Generate synthetic data and paraphrases."),
    "train": ("tunesmith.commands.train", "Train a model from a config."),
    "eval": ("tunesmith.commands.eval", "Evaluate a model, or compare base and tuned."),
    "export": ("tunesmith.commands.export", "Export an adapter, a merged model or GGUF."),
    "registry": ("tunesmith.commands.registry", "Version models: list, register, promote, rollback."),
    "serve": ("tunesmith.commands.serve", "Serve a base model with LoRA adapters (OpenAI-compatible)."),
    "plan": ("tunesmith.commands.plan", "Recommend an approach; estimate memory and time."),
    "human-eval": ("tunesmith.commands.human_eval", "Blinded human-evaluation sheets and a rating page."),
    "ab": ("tunesmith.commands.ab", "A/B test routing and analysis."),
    "sweep": ("tunesmith.commands.sweep", "Tune hyper-parameters with Optuna (pruning, resumable, plots)."),
}


class State:
    """Options of the root command, shared with every sub-command."""

    def __init__(self, strict: bool = False, disable: tuple[str, ...] = (), verbose: bool = False) -> None:
        self.strict = strict
        self.disable = disable
        self.verbose = verbose

    def registries(self, extra_disable: tuple[str, ...] | list[str] = ()) -> Any:
        from tunesmith.core.plugins import get_registries

        return get_registries(disable=tuple(self.disable) + tuple(extra_disable), strict=self.strict)


def get_state(ctx: click.Context | None = None) -> State:
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    if not (hasattr(root.obj, "registries") and hasattr(root.obj, "strict")):
        root.obj = State()
    return root.obj


class TunesmithGroup(click.Group):
    """Built-in commands from the table; plugin commands from ``register_commands``."""

    _plugin_commands: dict[str, click.Command] | None = None

    def _plugins(self, ctx: click.Context) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            self._plugin_commands = {}
            try:
                from tunesmith.core.plugins import load_plugins

                state = get_state(ctx)
                # built-in plugins register no commands: skip importing them here
                pm, _ = load_plugins(
                    disable=state.disable, strict=state.strict, only=lambda info: info.distribution != "tunesmith"
                )
                holder = click.Group()
                pm.hook.register_commands(cli=holder)
                self._plugin_commands = dict(holder.commands)
            except Exception as exc:  # noqa: BLE001 - never let a plugin break the CLI
                if get_state(ctx).strict:
                    raise
                click.echo(f"warning: plugin commands unavailable: {exc}", err=True)
        return self._plugin_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(BUILTIN_COMMANDS) | set(self.commands)
        names |= set(self._plugins(ctx))
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name in BUILTIN_COMMANDS:
            module = importlib.import_module(BUILTIN_COMMANDS[name][0])
            return module.command
        return self._plugins(ctx).get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in BUILTIN_COMMANDS:
                rows.append((name, BUILTIN_COMMANDS[name][1]))
            else:
                cmd = self.get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(60)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=TunesmithGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="tunesmith")
@click.option("--strict", is_flag=True, help="Fail when any plugin fails to load or register.")
@click.option(
    "--disable",
    "disable",
    multiple=True,
    metavar="ENTRY_POINT",
    help="Disable a plugin by its entry-point name (repeatable), e.g. --disable cleaner.pii.",
)
@click.option("-v", "--verbose", is_flag=True,
              help="Show the libraries' own warnings and logs (by default they go to the run's logs/tunesmith.log only).")
@click.pass_context
def cli(ctx: click.Context, strict: bool, disable: tuple[str, ...], verbose: bool) -> None:
    """tunesmith: fine-tune language models with plugins.

    Every technique (PEFT method, data format, cleaner, loss, evaluator,
    exporter, model source) is a plugin; `tunesmith plugins` lists them.
    """
    ctx.obj = State(strict=strict, disable=disable, verbose=verbose)
    if verbose:
        os.environ["TUNESMITH_VERBOSE"] = "1"
        quiet_libraries(verbose=True)


# --------------------------------------------------------------------------- library noise
#: loggers whose records reach the terminal by default (the rest go to the run's log file)
_OWN_LOGGERS = ("tunesmith",)
_RUN_LOG = "logs/tunesmith.log"


class _TerminalFilter:
    """What the terminal shows: tunesmith's own warnings and errors, anyone's errors,
    on rank 0 only; everything with --verbose."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def filter(self, record: Any) -> bool:
        import logging

        if self.verbose:
            return True
        if int(os.environ.get("RANK", "0")) != 0:
            return record.levelno >= logging.ERROR and record.name.startswith(_OWN_LOGGERS)
        if record.name.startswith(_OWN_LOGGERS):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR and record.name != "py.warnings"


class _Stderr:
    """A logging handler on whatever ``sys.stderr`` is now (test runners swap it)."""

    @staticmethod
    def handler() -> Any:
        import logging

        class Handler(logging.StreamHandler):
            @property  # type: ignore[override]
            def stream(self) -> Any:
                return sys.stderr

            @stream.setter
            def stream(self, value: Any) -> None:
                pass

        return Handler()


class _Buffer:
    """Log records kept until a run directory is known (the last 20,000)."""

    @staticmethod
    def handler() -> Any:
        import collections
        import logging

        class Handler(logging.Handler):
            def __init__(self) -> None:
                super().__init__(logging.DEBUG)
                self.buffer: collections.deque = collections.deque(maxlen=20_000)

            def emit(self, record: Any) -> None:
                self.buffer.append(record)

        return Handler()


def quiet_libraries(verbose: bool = False) -> None:
    """Route library noise (bitsandbytes' kernel notices, transformers' and peft's
    FutureWarnings and advisories, torch's UserWarnings) away from the terminal:
    Python warnings become log records, every log record is kept in memory until a
    run directory is known (:func:`attach_run_log` writes them to RUN/logs/tunesmith.log),
    and the terminal shows only what :class:`_TerminalFilter` lets through."""
    import logging

    root = logging.getLogger()
    if getattr(root, "_tunesmith_quiet", None) is not None:
        for h in root.handlers:
            for f in h.filters:
                if isinstance(f, _TerminalFilter):
                    f.verbose = verbose
        return
    logging.captureWarnings(True)
    import warnings

    warnings.simplefilter("default")  # each distinct warning once, into the log
    terminal = _Stderr.handler()
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    terminal.addFilter(_TerminalFilter(verbose))
    memory = _Buffer.handler()
    memory.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(terminal)
    root.addHandler(memory)
    root.setLevel(logging.INFO)
    root._tunesmith_quiet = memory  # type: ignore[attr-defined]
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "torch", "httpx", "urllib3",
                 "llama-cpp-python"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers logs through its own stderr handler: once it is imported (never
    # here: --help stays light), send its records through the root logger instead
    if "transformers.utils.logging" in sys.modules:
        _route_transformers(sys.modules["transformers.utils.logging"])
    else:
        sys.meta_path.insert(0, _AfterImport("transformers.utils.logging", _route_transformers))


def _route_transformers(hf_logging: Any) -> None:
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


class _AfterImport:
    """A meta-path finder that runs ``callback(module)`` right after ``name`` is imported."""

    def __init__(self, name: str, callback: Any) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            try:
                callback(module)
            except Exception:  # noqa: BLE001 - routing logs must never break an import
                pass

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def attach_run_log(run_dir: Any) -> Any:
    """Write every log record (the buffered ones first) to ``run_dir/logs/tunesmith.log``; returns the path."""
    import logging
    from pathlib import Path

    root = logging.getLogger()
    memory = getattr(root, "_tunesmith_quiet", None)
    if memory is None:
        return None
    path = Path(run_dir) / _RUN_LOG
    if int(os.environ.get("RANK", "0")) != 0:
        path = path.with_name(f"tunesmith-rank{os.environ['RANK']}.log")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            if Path(h.baseFilename) == path.resolve():
                return path
            root.removeHandler(h)  # an earlier run of this process
            h.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(memory.formatter)
    for record in list(memory.buffer):
        fh.handle(record)
    memory.buffer.clear()
    root.addHandler(fh)
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and a non-zero exit code."""
    from tunesmith.core.errors import TunesmithError

    # OpenMP threads that spin while waiting make torch many times slower when the
    # CPU is shared (measured here: 30-43 s per LoRA step instead of 8 s with two
    # busy neighbours); sleeping waiters cost little on an idle machine. Must be
    # set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = os.environ.get("TUNESMITH_VERBOSE") == "1" or "--verbose" in args or (bool(args) and args[0] == "-v")
    quiet_libraries(verbose=verbose)

    try:
        cli.main(args=argv, prog_name="tunesmith", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except TunesmithError as exc:
        click.echo(f"error: {exc}", err=True)
        for extra in getattr(exc, "errors", [])[1:]:
            click.echo(f"  {extra}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("TUNESMITH_DEBUG"):
            raise
        last = f"{type(exc).__name__}: {exc}".strip().splitlines()[-1]
        click.echo(f"error: {last} (set TUNESMITH_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


