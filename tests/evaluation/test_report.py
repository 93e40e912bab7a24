"""compare / evaluate_run on tiny models: the report, its charts and its numbers."""

import json

import pytest
import yaml

import tunesmith
from tunesmith.core.context import RunContext
from tunesmith.core.evaluation import compare_models, evaluate_run, specs_from_names

from .conftest import write_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def regs():
    return tunesmith.registry()


def _specs(regs, data):
    return specs_from_names(
        ["perplexity", "generation", "forgetting"],
        regs,
        {
            "perplexity": {"path": str(data), "progress": False},
            "generation": {"path": str(data), "limit": 2, "max_new_tokens": 4, "progress": False},
            "forgetting": {"limit": 3, "progress": False},
        },
    )


def test_compare_report_on_two_tiny_models(tmp_path, tiny_model_dir, tiny_model_dir_b, qa_file, regs):
    from tunesmith.core.models import load_from_dir

    base, tuned = load_from_dir(tiny_model_dir), load_from_dir(tiny_model_dir_b)
    metrics_log = write_jsonl(
        tmp_path / "metrics.jsonl", [{"step": s, "loss": 3 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.5}]
    )
    specs = _specs(regs, qa_file)
    rep = compare_models(base, tuned, specs, regs, tmp_path / "eval", metrics_path=metrics_log, meta={"base_model": "a", "tuned_model": "b"})
    out = tmp_path / "eval"
    for name in ("report.md", "report.json", "samples.jsonl"):
        assert (out / name).stat().st_size > 0
    for chart in ("perplexity", "generation", "forgetting", "loss"):
        assert (out / "charts" / f"{chart}.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "report.json").read_text())
    # the numbers are each model's own result, and the change is computed from them
    ctx = RunContext(registries=regs)
    ppl = regs.evaluators.get("perplexity")
    own_base = ppl.evaluate(base[0], base[1], specs[0][1], ctx)["metrics"]["perplexity"]
    own_tuned = ppl.evaluate(tuned[0], tuned[1], specs[0][1], ctx)["metrics"]["perplexity"]
    row = saved["comparison"]["perplexity"]["perplexity"]
    assert row["base"] == pytest.approx(own_base, rel=1e-6) and row["tuned"] == pytest.approx(own_tuned, rel=1e-6)
    assert row["relative_change_pct"] == pytest.approx((own_tuned - own_base) / own_base * 100, rel=1e-6)
    assert row["better"] == ("tuned" if own_tuned < own_base else "base")
    # forgetting: the tuned side names the base value from the comparison
    f = saved["tuned"]["forgetting"]["metrics"]
    assert f["general_perplexity_base"] == saved["base"]["forgetting"]["metrics"]["general_perplexity"]
    assert f["forgetting_pct"] == pytest.approx((f["general_perplexity"] / f["general_perplexity_base"] - 1) * 100)
    # the same decoding on both sides, side by side
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["prompt"] and "base" in s and "tuned" in s for s in samples)
    md = (out / "report.md").read_text()
    assert "| perplexity |" in md and "![loss](charts/loss.png)" in md and "| # | prompt | expected | base | tuned |" in md
    assert "General-text perplexity" in md


def test_evaluate_run_on_a_lora_run_directory(tmp_path, tiny_model_dir, qa_file, regs):
    import torch

    from tunesmith.core.models import INFO_FILE, load_from_dir
    from tunesmith.core.io import atomic_write_json

    run = tmp_path / "run"
    lora = regs.peft_methods.get("lora")
    opts = lora.Options(r=4, target_modules=["q_proj", "v_proj"])
    model, tok = load_from_dir(tiny_model_dir)
    model = lora.apply(model, opts, RunContext(registries=regs))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    final = run / "final"
    final.mkdir(parents=True)
    lora.save(model, final)
    tok.save_pretrained(str(final))
    atomic_write_json(final / INFO_FILE, {"base_model_dir": str(tiny_model_dir), "peft": {"method": "lora", "options": opts.model_dump(mode="json")}, "dtype": "float32"})
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"source": "hf", "path": str(tiny_model_dir)},
        "evaluation": [
            {"name": "perplexity", "path": str(qa_file), "progress": False},
            {"name": "forgetting", "limit": 3, "progress": False},
        ],
        "output_dir": str(run),
    }))
    cfg = tunesmith.load_config(cfg_path, registries=regs)
    rep = evaluate_run(cfg, regs, run)
    assert (run / "eval" / "report.md").exists() and (run / "eval" / "charts" / "loss.png").exists()
    assert "adapters disabled" in rep["meta"]["base_model"]
    # the base side equals the plain tiny model
    plain, ptok = load_from_dir(tiny_model_dir)
    ppl = regs.evaluators.get("perplexity")
    own = ppl.evaluate(plain, ptok, cfg.evaluation[0].options, RunContext(registries=regs))["metrics"]["perplexity"]
    assert rep["base"]["perplexity"]["metrics"]["perplexity"] == pytest.approx(own, rel=1e-5)
    assert rep["metrics"]["perplexity"]["perplexity"] != pytest.approx(own, rel=1e-3)
    assert "forgetting_pct" in rep["metrics"]["forgetting"]
