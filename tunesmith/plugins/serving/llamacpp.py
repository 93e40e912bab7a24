"""``llamacpp`` serving engine: ``llama-server -m BASE.gguf --lora A.gguf --lora B.gguf ...``.

llama.cpp serves LoRA adapters converted to its own GGUF LoRA files (``tunesmith
export RUN --format gguf-lora``) over one shared base GGUF. The adapters are loaded
with ``--lora-init-without-apply`` (scale 0), and each request picks its adapter by
id with llama-server's ``lora`` request field (``"lora": [{"id": 0, "scale": 1.0}]``);
the ids follow the order of the ``--adapter`` options and are printed at start.
``--opt lora_mode=all`` applies every adapter to every request instead (what one
adapter alone usually wants).

The checks read the GGUF headers only: the base is a model GGUF, each adapter a LoRA
adapter GGUF for the same architecture. Given a folder (a run directory), the one
adapter GGUF inside it is used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    executable: str = Field("llama-server", description="The llama-server command.")
    lora_mode: Literal["per-request", "all"] = Field(
        "per-request", description="per-request: adapters start at scale 0, requests choose by id; all: every request uses all.")
    ctx_size: int | None = Field(None, ge=1, description="--ctx-size")
    parallel: int | None = Field(None, ge=1, description="--parallel: request slots batched together.")
    n_gpu_layers: int | None = Field(None, ge=0, description="--n-gpu-layers")
    alias: str = Field("base", description="--alias: the model name the server reports.")
    extra_args: list[str] = Field(default_factory=list, description="More arguments for llama-server, passed as they are.")


def gguf_info(path: Path) -> dict[str, Any]:
    """``general.type``, ``general.architecture`` and ``adapter.type`` of a GGUF file
    (header only); raises ValueError when it is not a GGUF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    return {"type": get("general.type"), "architecture": get("general.architecture"), "adapter": get("adapter.type"),
            "alpha": get("adapter.lora.alpha")}


class LlamaCppEngine:
    name = "llamacpp"
    description = "Hand-off to llama.cpp: llama-server over one base GGUF with GGUF LoRA adapters (--lora)"
    Options = LlamaCppOptions

    def check(self, spec: Any, options: LlamaCppOptions) -> list[str]:
        return self._plan(spec)["problems"]

    def command(self, spec: Any, options: LlamaCppOptions) -> list[str]:
        plan = self._plan(spec)
        argv = [options.executable, "-m", plan["base"], "--host", spec.host, "--port", str(spec.port), "--alias", options.alias]
        for path in plan["adapters"].values():
            argv += ["--lora", path]
        if plan["adapters"] and options.lora_mode == "per-request":
            argv.append("--lora-init-without-apply")
        for flag, value in (("--ctx-size", options.ctx_size), ("--parallel", options.parallel),
                            ("--n-gpu-layers", options.n_gpu_layers)):
            if value is not None:
                argv += [flag, str(value)]
        return argv + list(options.extra_args)

    def adapter_ids(self, spec: Any) -> dict[str, int]:
        """Adapter name -> llama-server's adapter id (the ``lora`` request field)."""
        return {name: i for i, name in enumerate(spec.adapters)}

    def serve(self, spec: Any, options: LlamaCppOptions) -> None:
        from tunesmith.core.errors import TunesmithError

        problems = self.check(spec, options)
        if problems:
            raise TunesmithError("llama.cpp cannot serve this: " + "; ".join(problems))
        argv = self.command(spec, options)
        exe = shutil.which(argv[0])
        if exe is None:
            raise TunesmithError(f"'{argv[0]}' is not installed here",
                                 hint="install llama.cpp (llama-server) or give --opt executable=PATH; --dry-run prints the command")
        env = dict(os.environ)
        if spec.api_key:
            env["LLAMA_API_KEY"] = spec.api_key  # llama-server reads it; argv is visible in ps
        for name, i in self.adapter_ids(spec).items():
            click.echo(f'adapter {name}: request field "lora": [{{"id": {i}, "scale": 1.0}}]', err=True)
        click.echo("starting: " + " ".join(argv), err=True)
        os.execve(exe, argv, env)

    def _plan(self, spec: Any) -> dict:
        problems: list[str] = []
        if spec.registry:
            problems.append("--registry: the llamacpp engine does not route registry versions; pass them as --adapter NAME=PATH")
        base = _base_gguf(str(spec.base), problems)
        base_arch = None
        if base is not None:
            try:
                info = gguf_info(base)
                if info["type"] == "adapter":
                    problems.append(f"base: {base} is a LoRA adapter GGUF, not a model")
                base_arch = info["architecture"]
            except (OSError, ValueError) as exc:
                problems.append(f"base: {base}: {exc}")
        adapters: dict[str, str] = {}
        for name, path in spec.adapters.items():
            found, why = _adapter_gguf(Path(str(path)).expanduser())
            if found is None:
                problems.append(f"adapter '{name}': {why}")
                continue
            info = gguf_info(found)
            if info["type"] != "adapter" or (info["adapter"] not in (None, "lora")):
                problems.append(f"adapter '{name}': {found} is a {info['adapter'] or info['type'] or 'GGUF'} file, not a LoRA"
                                " adapter GGUF (tunesmith export RUN --format gguf-lora)")
            elif base_arch and info["architecture"] and info["architecture"] != base_arch:
                problems.append(f"adapter '{name}': made for architecture '{info['architecture']}', the base is '{base_arch}'")
            adapters[name] = str(found.resolve())
        return {"problems": problems, "base": str(base.resolve()) if base else str(spec.base), "adapters": adapters}


def _base_gguf(spec: str, problems: list[str]) -> Path | None:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        problems.append(f"base: {p} is a folder; llama.cpp needs the base model as one GGUF file"
                        " (tunesmith export RUN --format gguf, or convert_hf_to_gguf.py)")
        return None
    if spec == "default":
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.paths import default_gguf_path

        try:
            return default_gguf_path()
        except TunesmithError as exc:
            problems.append(f"base: {exc}")
            return None
    problems.append(f"base: {spec} is not a GGUF file")
    return None


def _adapter_gguf(p: Path) -> tuple[Path | None, str]:
    if p.is_file():
        return p, ""
    if not p.is_dir():
        return None, f"{p} does not exist"
    cands = []
    for f in sorted(p.rglob("*.gguf")):
        try:
            if gguf_info(f)["type"] == "adapter":
                cands.append(f)
        except (OSError, ValueError):
            continue
    if len(cands) == 1:
        return cands[0], ""
    if len(cands) > 1:
        return None, f"{p} holds several adapter GGUF files ({', '.join(c.name for c in cands)}); give one"
    if (p / "adapter_config.json").exists() or (p / "final" / "adapter_config.json").exists():
        return None, (f"{p} is a PEFT adapter; llama.cpp needs it as a GGUF LoRA file: "
                      f"tunesmith export {p} --format gguf-lora -o ADAPTER.gguf")
    return None, f"no adapter GGUF in {p}"


@hookimpl
def register_serving_engines(register: Any) -> None:
    register(LlamaCppEngine())
