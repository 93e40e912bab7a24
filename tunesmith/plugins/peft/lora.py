"""LoRA: low-rank adapters on chosen linear layers (peft), rsLoRA optional; mergeable."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.plugins.peft._common import PeftLibraryMethod, target_modules


class LoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(16, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[list[str], str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear' for every linear layer but the output head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full and saved with the adapter.")
    init_weights: Union[bool, str] = Field(True, description="peft's init_lora_weights (True, 'gaussian', 'pissa', ...).")
    fast_dropout: bool = Field(
        True,
        description="On CPU, draw the adapter-input dropout masks as 16-bit uniforms from 64-bit random words "
        "(a quarter of the draws of nn.Dropout; p quantised to 1/65536). No effect on GPU.",
    )
    fused: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Train each adapted linear layer as one fused autograd function on CPU (base matmul, dropout, "
        "both low-rank products and the scaled add; no fp32 copy of the activations). auto: where the frozen base "
        "is stored in bf16 (precision auto/bf16); on: also for an fp32 base (same numbers up to rounding); off: "
        "peft's forward. Evaluation, merged/mixed adapters and DoRA always use peft's forward.",
    )


class LoRA(PeftLibraryMethod):
    name = "lora"
    description = "LoRA low-rank adapters (r, alpha, dropout, target modules incl. all-linear, rsLoRA); mergeable"
    mergeable = True
    default_learning_rate = 2e-4
    Options = LoRAOptions
    use_dora = False

    def peft_config(self, model: Any, options: LoRAOptions, context: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=target_modules(options.target_modules),
            bias=options.bias,
            use_rslora=options.use_rslora,
            modules_to_save=options.modules_to_save,
            init_lora_weights=options.init_weights,
            use_dora=self.use_dora,
            # rows of tokens the run's chat template added (core/templates.py): trained
            # and saved with the adapter, so plain PeftModel.from_pretrained restores them
            trainable_token_indices=_template_token_rows(context),
        )

    def apply(self, model: Any, options: LoRAOptions, context: Any) -> Any:
        model = super().apply(model, options, context)
        if options.fast_dropout and options.dropout > 0.0:
            from tunesmith.plugins.peft._dropout import use_fast_dropout

            use_fast_dropout(model)
        if _fuse(options.fused, model):
            from tunesmith.plugins.peft._fused import use_fused_lora

            use_fused_lora(model)
        return model


def _fuse(mode: str, model: Any) -> bool:
    """``fused: auto`` fuses where the frozen base is stored in 16 bits on the CPU."""
    if mode != "auto":
        return mode == "on"
    import torch

    frozen = next((p for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return frozen is not None and frozen.device.type == "cpu" and frozen.dtype in (torch.bfloat16, torch.float16)


def _template_token_rows(context: Any) -> Any:
    state = getattr(context, "state", None) or {}
    record = state.get("chat_template") or getattr(state.get("session"), "chat_template", None) or {}
    return record.get("trainable_token_indices") or None


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(LoRA())
