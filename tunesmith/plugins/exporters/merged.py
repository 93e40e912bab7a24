"""``merged`` exporter: the adapter merged into the base weights, saved as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class MergedExporter:
    name = "merged"
    description = "LoRA merged into the base weights (merge_and_unload): safetensors + tokenizer + chat template"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overwrite: bool = Field(False, description="Replace an existing output folder.")
        dtype: Literal["float32", "bfloat16", "float16"] = Field(
            "float32", description="dtype of the saved weights; the merge itself always runs in float32."
        )
        check: bool = Field(True, description="Compare the merged model's logits with the adapter model's.")
        tolerance: float = Field(
            1e-3,
            description="Largest allowed absolute logit difference (float32); QLoRA and half precision get a looser bound.",
        )
        qlora_base: Literal["dequantized", "original"] = Field(
            "dequantized",
            description="QLoRA: merge into a float32 dequantised copy of the 4-bit base (what training saw) or into the original base weights.",
        )
        max_shard_size: str = Field("2GB", description="safetensors shard size.")

    def export(self, run_dir: Path, output: Path, options: Any, context: Any) -> Path:
        import torch

        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.export import MANIFEST, manifest, merge_run, read_run
        from tunesmith.core.io import atomic_dir, atomic_write_json

        options = options or self.Options()
        run = read_run(run_dir)
        if Path(output).exists() and not options.overwrite:
            raise TunesmithError(f"{output} already exists", hint="pass --overwrite to replace it")
        merged = merge_run(run, registries=getattr(context, "registries", None), check=options.check,
                           qlora_base=options.qlora_base)
        info = dict(merged.check)
        if "max_abs_logit_diff" in info:
            tol = options.tolerance
            if run.quantized:
                tol = max(tol, 0.05)  # the 4-bit kernels compute in bf16 on some CPUs
            info["tolerance"] = tol
            if info["max_abs_logit_diff"] > tol:
                raise TunesmithError(
                    f"the merged model's logits differ from the adapter model's by {info['max_abs_logit_diff']:.3g} "
                    f"(> {tol:g}); not writing {output}"
                )
        model = merged.model.to(getattr(torch, options.dtype))
        model.config.dtype = options.dtype
        tok = merged.tokenizer
        gen = model.generation_config
        if gen is not None:
            if gen.pad_token_id is None and tok.pad_token_id is not None:
                gen.pad_token_id = tok.pad_token_id
        with atomic_dir(output, overwrite=options.overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=options.max_shard_size)
            tok.save_pretrained(tmp)
            if getattr(tok, "chat_template", None) and not (tmp / "chat_template.jinja").exists():
                (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
            atomic_write_json(tmp / MANIFEST, manifest(run, self.name, dtype=options.dtype, check=info))
        return Path(output)


@hookimpl
def register_exporters(register):  # type: ignore[no-untyped-def]
    register(MergedExporter())
