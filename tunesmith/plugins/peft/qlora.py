"""QLoRA: LoRA over a 4-bit (bitsandbytes nf4, double-quantised) frozen base model.

Runs on CPU too with bitsandbytes >= 0.45 (slowly). The adapter is saved in the
PEFT layout; loading it for evaluation or merging uses the unquantised base.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunesmith import hookimpl
from tunesmith.plugins.peft.lora import LoRA, LoRAOptions


class QLoRAOptions(LoRAOptions):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/parameter).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the matmuls; auto is bfloat16 on a GPU, float32 on CPU."
    )


class QLoRA(LoRA):
    name = "qlora"
    description = "QLoRA: LoRA on a 4-bit nf4 base (bitsandbytes, double quantisation, compute dtype); mergeable"
    mergeable = True
    default_learning_rate = 2e-4
    Options = QLoRAOptions

    def quantization_config(self, options: QLoRAOptions) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        from tunesmith.core.errors import TunesmithError

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TunesmithError("qlora needs bitsandbytes", hint="pip install 'tunesmith[qlora]'") from None
        if options.compute_dtype == "auto":
            cdt = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if torch.cuda.is_available() else torch.float32
        else:
            cdt = getattr(torch, options.compute_dtype)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.quant_type,
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=cdt,
        )

    def prepare(self, model: Any, options: QLoRAOptions, context: Any) -> Any:
        from peft import prepare_model_for_kbit_training

        gc = False
        cfg = getattr(context, "config", None)
        if cfg is not None:
            gc = bool(cfg.training.gradient_checkpointing)
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None
        )


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(QLoRA())
