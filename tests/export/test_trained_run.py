"""Integration: a run trained by tunesmith's own trainer exports with every format."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def _train(tmp_path: Path, tiny_model_dir: Path, tiny_chat_file: Path, peft: dict) -> Path:
    import tunesmith
    from tunesmith.core.session import train

    cfg = {
        "model": {"source": "hf", "path": str(tiny_model_dir)},
        "data": {"path": str(tiny_chat_file), "cleaners": []},
        "peft": peft,
        "training": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
                     "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant"},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    tunesmith.reset_plugins()
    train(tunesmith.load_config(path))
    return tmp_path / "run"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_trained_run_exports(tmp_path: Path, tiny_model_dir: Path, tiny_chat_file: Path, method: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.export.conftest import plain_logits
    from tunesmith.core.export import export_run
    from tunesmith.core.models import load_trained

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    run = _train(tmp_path, tiny_model_dir, tiny_chat_file,
                 {"method": method, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0})
    adapter = export_run(run, "adapter")
    assert (adapter / "adapter_model.safetensors").exists()
    merged = export_run(run, "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    got = plain_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tok)
    if method == "lora":
        model, _, _ = load_trained(run)  # the training engineer's loader
        ref = plain_logits(model, tok)
        assert (got - ref).abs().max() < 1e-4
    else:  # QLoRA: the reference is the adapter on the 4-bit base it was trained on (plain peft)
        import tunesmith
        from tests.export.conftest import adapter_logits
        from tunesmith.core.export import read_run

        bnb = read_run(run).bnb_config(tunesmith.registry())
        ref = adapter_logits(run, tiny_model_dir, quantization=bnb)
        assert (got - ref).abs().max() < 0.05
