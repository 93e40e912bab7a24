"""Every example config runs through ``tunesmith run`` (a step or two on the tiny model).

The overrides only swap the model for the tiny one, shorten training and evaluation
and move outputs to a temporary folder; everything else is the example as shipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PLUGIN_PACKAGE = EXAMPLES / "plugins" / "tunesmith-example"
GENERATES = {"generation", "keyword_coverage"}


def overrides(config: Path, model_dir: Path, tmp: Path) -> list[str]:
    data = yaml.safe_load(config.read_text())
    sets = [f"model.source=hf", f"model.path={model_dir}", "training.max_steps=2", "training.save_steps=2",
            f"registry.path={tmp / 'registry'}"]
    tr = data.get("training") or {}
    if tr.get("eval_steps", 100) <= tr.get("max_steps", 10**9):  # keep "no in-training eval" as configured
        sets.append("training.eval_steps=2")
    for i, ev in enumerate(data.get("evaluation") or []):
        sets.append(f"evaluation.{i}.limit=2")
        if ev["name"] in GENERATES:
            sets.append(f"evaluation.{i}.max_new_tokens=3")
    out = []
    for s in sets:
        out += ["--set", s]
    return [*out, "-o", str(tmp / config.stem)]


def run_example(name: str, model_dir: Path, tmp: Path, *extra: str) -> dict:
    from tunesmith.cli import cli

    config = EXAMPLES / name
    r = CliRunner().invoke(cli, ["run", str(config), *overrides(config, model_dir, tmp), *extra, "--json"])
    assert r.exit_code == 0, f"{name}: {r.exception!r}\n{r.output[-3000:]}"
    summary = json.loads(r.stdout)
    assert all(v["status"] == "done" for v in summary["stages"].values()), summary["stages"]
    return summary


def test_example_data_is_current() -> None:
    for script in ("make_quickstart.py", "make_examples.py"):
        r = subprocess.run([sys.executable, str(EXAMPLES / "data" / script), "--check"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_multitask(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = run_example("multitask.yaml", tiny_model_dir, tmp_path)
    report = json.loads((tmp_path / "multitask" / "data" / "report.json").read_text())
    mixing = report.get("mixing") or {}
    assert mixing, report.keys()
    # temperature mixing (T = 2): both tasks take part, and the smaller task is drawn
    # more often than its share of the rows
    assert mixing["strategy"] == "temperature" and mixing["temperature"] == 2.0
    sources = mixing["sources"]
    assert len(sources) == 2 and all(src["drawn"] > 0 for src in sources), sources
    small = min(sources, key=lambda src: src["size"])
    rows = sum(src["size"] for src in sources)
    drawn = sum(src["drawn"] for src in sources)
    assert small["drawn"] / drawn > small["size"] / rows, sources
    assert s["data"]["kept"] > 0


def test_dpo(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = run_example("dpo.yaml", tiny_model_dir, tmp_path)
    assert s["train"]["steps"] == 2
    info = json.loads((tmp_path / "dpo" / "final" / "tunesmith.json").read_text())
    assert info["objective"] == "dpo"


@pytest.mark.parametrize("name", ["kto", "orpo"])
def test_preference_objectives(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    s = run_example(f"{name}.yaml", tiny_model_dir, tmp_path)
    assert s["train"]["steps"] == 2
    info = json.loads((tmp_path / name / "final" / "tunesmith.json").read_text())
    assert info["objective"] == name


def test_rloo(tiny_model_dir: Path, tmp_path: Path) -> None:
    """RL examples train on prompt rows (no data stage): ``tunesmith train``."""
    from tunesmith.cli import cli

    config = EXAMPLES / "rloo.yaml"
    sets = [f"model.source=hf", f"model.path={tiny_model_dir}", "training.max_steps=2", "objective.max_new_tokens=4"]
    r = CliRunner().invoke(cli, ["train", str(config), *[a for s in sets for a in ("--set", s)], "-o", str(tmp_path / "rloo"), "--json"])
    assert r.exit_code == 0, f"rloo.yaml: {r.exception!r}\n{r.output[-3000:]}"
    result = json.loads((tmp_path / "rloo" / "train_result.json").read_text())
    assert result["objective"] == "rloo" and result["steps"] == 2 and "reward_end" in result


def test_distill_from_the_quickstart_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_example("quickstart.yaml", tiny_model_dir, tmp_path)
    s = run_example("distill.yaml", tiny_model_dir, tmp_path, "--set", f"objective.teacher={tmp_path / 'quickstart'}")
    assert s["train"]["steps"] == 2
    result = json.loads((tmp_path / "distill" / "train_result.json").read_text())
    assert result["objective"] == "distill" and result["teacher"].startswith("tunesmith run")


def test_continued_pretraining(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = run_example("continued_pretraining.yaml", tiny_model_dir, tmp_path)
    assert s["train"]["steps"] >= 1
    assert any(r["metric"] == "perplexity" for r in s["metrics"])
    assert Path(s["artefacts"]["exports"]["merged"]).is_dir()


def test_sequential_ewc_and_replay(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_example("sequential_a.yaml", tiny_model_dir, tmp_path)
    s = run_example("sequential_b.yaml", tiny_model_dir, tmp_path, "--set", f"losses.1.anchor={tmp_path / 'sequential_a'}")
    b = tmp_path / "sequential_b"
    assert (b / "ewc").is_dir()  # Fisher + anchor written by the EWC loss
    logged = (b / "metrics.jsonl").read_text()
    assert "loss/ewc" in logged
    report = json.loads((b / "data" / "report.json").read_text())
    assert report.get("replay"), report.keys()


def test_qlora(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    s = run_example("qlora.yaml", tiny_model_dir, tmp_path)
    info = json.loads((tmp_path / "qlora" / "final" / "tunesmith.json").read_text())
    assert info["peft"]["method"] == "qlora"
    assert Path(s["artefacts"]["exports"]["merged"]).is_dir()


@pytest.fixture(scope="module")
def example_package(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The example plugin package pip-installed into a folder only the subprocess sees."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("build") / "src"
    shutil.copytree(PLUGIN_PACKAGE, src)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], check=True, capture_output=True)
    return {"PYTHONPATH": os.pathsep.join([str(target), *[p for p in sys.path if p]])}


def test_third_party_plugins_in_a_run(tiny_model_dir: Path, tmp_path: Path, example_package: dict) -> None:
    config = EXAMPLES / "plugin_example.yaml"
    r = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(config), *overrides(config, tiny_model_dir, tmp_path),
                        "--json"], capture_output=True, text=True, env={**os.environ, **example_package})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    run = tmp_path / "plugin_example"
    # banned_words rejected the tickets from the cities in its list
    assert s["data"]["rejected_by"].get("banned_words", 0) > 0
    rejects = [json.loads(x) for x in (run / "data" / "rejects.jsonl").read_text().splitlines()]
    assert any(x["cleaner"] == "banned_words" and "Nairobi" in x["reason"] + json.dumps(x["record"]) for x in rejects)
    # the replacement normalize folded the curly quotes and dashes
    kept = (run / "data" / "train.jsonl").read_text() + (run / "data" / "validation.jsonl").read_text() + \
        (run / "data" / "test.jsonl").read_text()
    assert "typed_on" in kept and "\\u2014" not in kept and "\u2014" not in kept and "\u201c" not in kept
    # keyword_coverage evaluated base and tuned
    cov = [m for m in s["metrics"] if m["evaluator"] == "keyword_coverage" and m["metric"] == "keyword_coverage"]
    assert cov and cov[0]["base"] is not None and cov[0]["tuned"] is not None
