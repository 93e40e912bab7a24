"""``adapter`` exporter: the PEFT adapter folder, as plain peft, vLLM and TGI load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class AdapterExporter:
    name = "adapter"
    description = "PEFT adapter folder (adapter_config.json + adapter_model.safetensors, tokenizer beside it)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overwrite: bool = Field(False, description="Replace an existing output folder.")
        base_model_name: str | None = Field(
            None,
            description="Written as base_model_name_or_path (the hub id vLLM/TGI serve); default: the base's hub id where known "
            "(the default model's: HuggingFaceTB/SmolLM2-135M-Instruct), else the local base folder.",
        )
        include_tokenizer: bool = Field(True, description="Copy the run's tokenizer files (and chat template) beside the adapter.")

    def export(self, run_dir: Path, output: Path, options: Any, context: Any) -> Path:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.export import (
            INFO_FILE, MANIFEST, TOKENIZER_FILES, copy_files, manifest, read_run, refuse_pickles,
        )
        from tunesmith.core.io import atomic_dir, atomic_write_json

        options = options or self.Options()
        run = read_run(run_dir)
        if not run.is_peft_adapter:
            what = "a full model" if run.is_full_model else f"no PEFT adapter (method '{run.method}')"
            raise TunesmithError(
                f"{run.final_dir} holds {what}, not a PEFT adapter folder",
                hint="use --format merged for full fine-tunes",
            )
        weights = run.final_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise TunesmithError(f"{run.final_dir} has adapter_config.json but no adapter_model.safetensors")
        refuse_pickles(run.final_dir)
        cfg = run.adapter_config
        registries = getattr(context, "registries", None)
        base_name = options.base_model_name
        if base_name is None:  # the hub id where known (loads on any machine), else the local folder
            from tunesmith.core.models import hub_id_of

            try:
                base_dir = run.base_model_dir(registries)
                base_name = hub_id_of(base_dir) or str(base_dir.resolve())
            except TunesmithError:
                base_name = cfg.get("base_model_name_or_path")
        cfg["base_model_name_or_path"] = base_name
        with atomic_dir(output, overwrite=options.overwrite) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            copy_files(run.final_dir, tmp, ["adapter_model.safetensors", INFO_FILE, "README.md"])
            copied = copy_files(run.final_dir, tmp, list(TOKENIZER_FILES)) if options.include_tokenizer else []
            atomic_write_json(tmp / MANIFEST, manifest(run, self.name, base_model_name_or_path=base_name, tokenizer_files=copied))
        return Path(output)


@hookimpl
def register_exporters(register):  # type: ignore[no-untyped-def]
    register(AdapterExporter())
