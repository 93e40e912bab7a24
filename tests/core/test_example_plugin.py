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
