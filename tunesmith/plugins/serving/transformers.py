"""``transformers`` serving engine: the in-process OpenAI-compatible server.

One base model, any number of LoRA adapters (peft), continuous batching across
adapters (:mod:`tunesmith.serving.engine`); ``--mode serial`` serves one request
at a time instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tunesmith import hookimpl
from tunesmith.serving.server import BATCHABLE_PEFT_TYPES, ServerOptions


class TransformersEngine:
    name = "transformers"
    description = "In-process server (transformers + peft): many LoRA adapters on one base, continuous batching across them"
    Options = ServerOptions

    def check(self, spec: Any, options: ServerOptions) -> list[str]:
        """Adapters that cannot load (missing, pickle-only, or not batchable in batched mode)."""
        from tunesmith.core.errors import TunesmithError
        from tunesmith.serving.server import NAME_RE, resolve_adapter

        problems: list[str] = []
        base = Path(str(spec.base)).expanduser()
        if ("/" in str(spec.base) or base.suffix == ".gguf") and not base.exists():
            problems.append(f"base: {spec.base} does not exist")
        for name, path in spec.adapters.items():
            if not NAME_RE.fullmatch(name) or name in ("base", "production"):
                problems.append(f"adapter '{name}': invalid name (letters, digits, '.', '_', ':', '-'; not 'base' or 'production')")
                continue
            try:
                folder = resolve_adapter(path)
            except TunesmithError as exc:
                problems.append(f"adapter '{name}': {exc}")
                continue
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            ptype = str(cfg.get("peft_type", "?"))
            if ptype in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "ADAPTION_PROMPT", "CPT"):
                problems.append(f"adapter '{name}': {ptype} adapters cannot share a base model with others")
            elif options.mode == "batched" and ptype not in BATCHABLE_PEFT_TYPES:
                problems.append(f"adapter '{name}': {ptype} adapters cannot take part in mixed-adapter batches (LoRA and DoRA"
                                " can); serve with --mode serial")
        return problems

    def serve(self, spec: Any, options: ServerOptions) -> None:
        from tunesmith.serving.server import ModelServer, create_app, serve

        server = ModelServer.from_paths(spec.base, spec.adapters, registries=spec.registries, registry=spec.registry,
                                        options=options)
        click.echo(f"serving {', '.join(server.names())} on http://{spec.host}:{spec.port}/v1 ({server.mode}, "
                   f"max batch {server.engine.max_batch_size}, device {server.device})"
                   + (" (API key required)" if spec.api_key else ""), err=True)
        try:
            serve(create_app(server, api_key=spec.api_key), host=spec.host, port=spec.port, log_level=spec.log_level)
        finally:
            server.close()


@hookimpl
def register_serving_engines(register: Any) -> None:
    register(TransformersEngine())
