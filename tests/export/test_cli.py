"""The export and registry commands as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tunesmith.cli import cli


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        from tunesmith.core.errors import TunesmithError

        assert isinstance(res.exception, TunesmithError), res.exception
        return 1, str(res.exception)
    return res.exit_code, res.output


def test_export_and_registry_cli(lora_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    code, out = _run("export", str(run), "--format", "adapter", "--json")
    assert code == 0, out
    assert json.loads(out)["exports"] == [{"format": "adapter", "path": str(run / "exports" / "adapter")}]
    code, out = _run("export", str(run), "--format", "adapter")
    assert code == 1 and "already exists" in out
    code, out = _run("export", str(run), "-f", "merged", "-o", str(tmp_path / "m"), "--option", "dtype=bfloat16")
    assert code == 0 and (tmp_path / "m" / "model.safetensors").exists()

    reg = str(tmp_path / "reg")
    code, out = _run("registry", "register", str(run), "-r", reg, "--metric", "ppl=3.5", "--json")
    assert code == 0, out
    v1 = json.loads(out)
    assert v1["version"] == "v1" and "adapter" in v1["artifacts"] and v1["metrics"] == {"ppl": 3.5}
    assert v1["base_model"] and v1["metadata"]["method"] == "lora"
    assert _run("registry", "register", str(tmp_path / "m"), "-r", reg, "--version", "v2")[0] == 0
    code, out = _run("registry", "register", str(tmp_path / "m"), "-r", reg, "--version", "../x")
    assert code != 0 and "invalid version name" in out
    code, out = _run("registry", "register", str(tmp_path / "missing"), "-r", reg)
    assert code != 0 and "does not exist" in out
    assert _run("registry", "promote", "v1", "production", "-r", reg)[0] == 0
    assert _run("registry", "promote", "v2", "canary", "--share", "0.1", "-r", reg)[0] == 0
    code, out = _run("registry", "list", "-r", reg, "--json")
    data = json.loads(out)
    assert data["production"] == "v1" and data["canary"] == "v2" and data["traffic"] == {"v2": 0.1, "v1": 0.9}
    assert _run("registry", "promote", "v2", "production", "-r", reg)[0] == 0
    code, out = _run("registry", "rollback", "-r", reg, "--json")
    assert code == 0 and json.loads(out)["version"] == "v1"
    code, out = _run("registry", "show", "-r", reg, "--json")
    assert json.loads(out)["version"] == "v1"
    code, out = _run("registry", "list", "-r", reg)
    assert code == 0 and "v1" in out and "production" in out
