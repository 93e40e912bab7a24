"""The example third-party package: installed with pip, discovered, used, removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "plugins" / "tunesmith-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the package into a temporary target that only the subprocesses see."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    src = build / "src"
    shutil.copytree(PACKAGE, src)  # keep build artefacts out of the repo
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    yield {"PYTHONPATH": os.pathsep.join([str(target), *[p for p in sys.path if p]])}
    shutil.rmtree(target)  # "uninstall": the package is gone with its target


def cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_listed_with_distribution_and_replacement(installed):
    r = cli("plugins", "--json", env=installed)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    cleaners = data["areas"]["cleaners"]
    banned = [e for e in cleaners if e["name"] == "banned_words"][0]
    assert banned["distribution"] == "tunesmith-example" and banned["version"] == "0.2.0"
    builtin = [e for e in cleaners if e["name"] == "normalize" and e["distribution"] == "tunesmith"][0]
    assert builtin["status"] == "replaced" and "tunesmith-example" in builtin["replaced_by"]
    evaluators = {e["name"]: e for e in data["areas"]["evaluators"]}
    assert evaluators["keyword_coverage"]["distribution"] == "tunesmith-example"
    r = cli("example-info", env=installed)
    assert r.returncode == 0 and "tunesmith-example 0.2.0" in r.stdout


def test_used_by_data_clean(installed, tmp_path):
    rows = [
        {"instruction": "Greet", "output": "\u201cHello\u201d \u2014 nice to meet you."},
        {"instruction": "Fill", "output": "Lorem ipsum dolor sit amet, this is filler."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  cleaners: [{name: normalize}, {name: banned_words, words: [lorem]}]\n", encoding="utf-8")
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    r = cli("data", "clean", str(src), "-o", str(out), "--config", str(cfg), "--rejects", str(rejects), env=installed)
    assert r.returncode == 0, r.stderr
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(kept) == 1
    assert kept[0]["messages"][-1]["content"] == '"Hello" - nice to meet you.'
    rejected = [json.loads(l) for l in rejects.read_text().splitlines()]
    assert len(rejected) == 1 and "banned word 'Lorem'" in json.dumps(rejected[0])
    # disabling the replacement brings the built-in normalize back (no typographic folding)
    r = cli("--disable", "example.typography", "data", "clean", str(src), "-o", str(out), "--config", str(cfg), env=installed)
    assert r.returncode == 0, r.stderr
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    assert "\u201cHello\u201d" in kept[0]["messages"][-1]["content"]


def test_not_installed_means_not_listed():
    r = cli("plugins", "--json", env={})
    names = [e["name"] for e in json.loads(r.stdout)["areas"]["cleaners"]]
    assert "banned_words" not in names


def test_an_objective_from_the_package_trains_with_tunesmith_train(installed, tmp_path, tiny_model_dir):
    """One file and one entry point add an objective: `tunesmith train` runs it."""
    r = cli("plugins", "--json", env=installed)
    objectives = {e["name"]: e for e in json.loads(r.stdout)["areas"]["objectives"]}
    assert objectives["best_of_n"]["distribution"] == "tunesmith-example"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say a word about topic {i}."}) + "\n" for i in range(4)), encoding="utf-8")
    cfg = tmp_path / "bon.yaml"
    cfg.write_text(json.dumps({
        "model": {"source": "hf", "path": str(tiny_model_dir)},
        "data": {"path": str(prompts)},
        "objective": {"name": "best_of_n", "n": 3, "max_new_tokens": 4,
                      "rewards": [{"name": "length", "unit": "chars", "max": 8, "tolerance": 40}]},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 0,
                     "eval_steps": 0, "report_to": [], "precision": "fp32", "gradient_checkpointing": False},
        "output_dir": str(tmp_path / "run"),
    }), encoding="utf-8")
    r = cli("train", str(cfg), "--json", env={**installed, "TUNESMITH_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["objective"] == "best_of_n" and result["steps"] == 2 and result["kept"] >= 1
    info = json.loads((tmp_path / "run" / "final" / "tunesmith.json").read_text())
    assert info["objective"] == "best_of_n"
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
