"""The command line: fast start-up, plugin listing, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith

from .test_plugins import cleaner_module


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=full_env, cwd=cwd
    )


def pythonpath_env() -> dict:
    return {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and tunesmith.__version__ in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["train", "--help"]])
def test_light_commands_import_no_torch(args):
    code = (
        "import sys\n"
        "from tunesmith.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY=\n" in r.stderr, r.stderr[-2000:]


def test_plugins_json_lists_areas_with_distribution_and_version():
    r = run_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["areas"]) >= {
        "model_sources",
        "peft_methods",
        "data_formats",
        "cleaners",
        "losses",
        "evaluators",
        "exporters",
    }
    builtins = [p for p in data["plugins"] if p["distribution"] == "tunesmith"]
    assert builtins and all(p["version"] == tunesmith.__version__ for p in builtins)
    for entries in data["areas"].values():
        for e in entries:
            assert {"name", "description", "distribution", "version", "status"} <= set(e)


def test_broken_plugin_reported_and_strict_fails(tmp_path):
    from .conftest import make_dist

    root = make_dist(tmp_path / "d", "acme-broken", {"acme_broken": "raise ImportError('acme needs libfoo')\n"}, {"acme.broken": "acme_broken"})
    env = {"PYTHONPATH": str(root) + os.pathsep + pythonpath_env()["PYTHONPATH"]}
    r = run_cli("plugins", "--json", env=env)
    assert r.returncode == 0
    failures = json.loads(r.stdout)["failures"]
    broken = [f for f in failures if f["name"] == "acme.broken"][0]
    assert broken["distribution"] == "acme-broken" and "acme needs libfoo" in broken["error"]
    r = run_cli("--strict", "plugins", env={**env, "TUNESMITH_LOAD_PLUGINS": "acme.broken"})
    assert r.returncode != 0
    assert "acme.broken" in r.stderr and "acme needs libfoo" in r.stderr
    assert "Traceback" not in r.stderr
    # the rest of the CLI keeps working with the broken plugin installed
    assert run_cli("--version", env=env).returncode == 0


def test_plugin_commands_and_disable(tmp_path):
    from .conftest import make_dist

    code = cleaner_module("shout") + (
        "\nimport click\n@hookimpl\ndef register_commands(cli):\n"
        "    @cli.command('acme-hello')\n    def hello():\n        'Say hello from acme.'\n        click.echo('hello from acme')\n"
    )
    root = make_dist(tmp_path / "d", "acme-cmd", {"acme_cmd": code}, {"acme.cmd": "acme_cmd"})
    env = {"PYTHONPATH": str(root) + os.pathsep + pythonpath_env()["PYTHONPATH"]}
    r = run_cli("--help", env=env)
    assert "acme-hello" in r.stdout and "Say hello from acme." in r.stdout
    r = run_cli("acme-hello", env=env)
    assert r.stdout.strip() == "hello from acme"
    r = run_cli("--disable", "acme.cmd", "plugins", "--json", env=env)
    data = json.loads(r.stdout)
    assert [p["status"] for p in data["plugins"] if p["name"] == "acme.cmd"] == ["disabled"]
    assert not [e for e in data["areas"]["cleaners"] if e["name"] == "shout"]


def test_config_validate_error_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  batch_sise: 4\n", encoding="utf-8")
    r = run_cli("config", "validate", str(p), env={"TUNESMITH_LOAD_PLUGINS": ""})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{p}:2: training.batch_sise: unknown key 'batch_sise'; did you mean 'batch_size'?" in r.stderr
    r = run_cli("config", "validate", str(p), "--json", env={"TUNESMITH_LOAD_PLUGINS": ""})
    data = json.loads(r.stdout)
    assert data["valid"] is False and data["line"] == 2 and data["key"] == "training.batch_sise"


def test_config_schema_is_json():
    r = run_cli("config", "schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert "training" in schema["properties"]
