"""Slow tier: the real default model (SmolLM2-135M-Instruct) with a template chosen by
name, exported to GGUF, read and run by llama.cpp itself, which renders prompts
exactly as training did; its GGUF LoRA over the base GGUF answers as the merged file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.models.test_llamacpp import HAVE_LLAMACPP, SKIP_REASON, llamacpp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.skipif(not HAVE_LLAMACPP, reason=SKIP_REASON)]

CONV = [{"role": "user", "content": "Route this support ticket.\n\nMy invoice is wrong."}]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    import tunesmith
    from tunesmith.core.session import train

    root = tmp_path_factory.mktemp("default-alpaca")
    quick = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"
    cfg = {"model": {"source": "default"}, "chat_template": "alpaca", "data": {"path": str(quick)},
           "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
           "training": {"max_steps": 6, "batch_size": 2, "learning_rate": 2e-3, "max_length": 128, "save_steps": 0,
                        "eval_steps": 0, "report_to": [], "early_stopping": None, "gradient_checkpointing": False,
                        "precision": "fp32"},
           "evaluation": [], "output_dir": str(root / "run")}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    tunesmith.reset_plugins()
    return train(tunesmith.load_config(root / "c.yaml"))["run_dir"], root


def test_llamacpp_renders_and_runs_the_trained_default_model(default_run):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from tunesmith.core.export import export_run
    from tunesmith.plugins.chat_templates.alpaca import TEMPLATE

    run, root = default_run
    tok = AutoTokenizer.from_pretrained(Path(run) / "final")
    assert tok.chat_template == TEMPLATE
    files = [export_run(run, "gguf", root / "gguf", options={"type": t}, overwrite=True) for t in ("q8_0", "q4_k_m")]
    results = llamacpp([{"model": f} for f in files], text=tok.apply_chat_template(CONV, tokenize=False,
                                                                                  add_generation_prompt=True), generate=8)
    for f, res in zip(files, results):
        meta = res["metadata"]
        assert meta["tokenizer.chat_template"] == TEMPLATE
        # llama.cpp's own Jinja rendering of the GGUF's template is the training rendering
        fmt = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=tok.eos_token,
                                  bos_token=tok.bos_token or "")
        assert fmt(messages=CONV).prompt == tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
        assert len(res["generated"]) == 8, f.name  # quantised files generate (no crash)
        modelfile = f.with_suffix(".Modelfile").read_text()
        assert "### Instruction:" in modelfile and "SYSTEM" in modelfile


def test_default_model_gguf_lora_over_base_answers_as_merged(default_run):
    from tunesmith.core.export import export_run

    run, root = default_run
    out = export_run(run, "gguf-lora", root / "lora", options={"base_type": "f16"})
    assert json.loads((out / "tunesmith_export.json").read_text())["base_gguf"] == "base-f16.gguf"
    merged = export_run(run, "gguf", root / "merged", options={"type": "f16"})
    lora, full = llamacpp([{"model": out / "base-f16.gguf", "lora": out / "adapter.gguf"}, {"model": merged}],
                          generate=12)
    a, b = np.array(lora["scores"]), np.array(full["scores"])
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert lora["generated"] == full["generated"]
