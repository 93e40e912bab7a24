"""The model registry: stages, rollback, routing, concurrency across processes, corruption."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from tunesmith.model_registry.local import ModelRegistry, RegistryCorrupted, RegistryError


@pytest.fixture
def art(tmp_path: Path) -> Path:
    p = tmp_path / "artefacts" / "adapter"
    p.mkdir(parents=True)
    (p / "adapter_config.json").write_text("{}")
    return p


def test_register_promote_rollback(tmp_path: Path, art: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    v1 = reg.register(art, metrics={"ppl": 3.2}, config_hash="abc", base_model="smollm2", metadata={"note": "first"})
    assert v1["version"] == "v1" and v1["artifacts"] == {"adapter": str(art.resolve())} and v1["stage"] == "registered"
    v2 = reg.register({"adapter": art}, version="v2-dpo")
    assert reg.production() is None
    reg.promote("v1", "production")
    assert reg.production()["version"] == "v1" and reg.current_path() == art.resolve()
    reg.promote("v2-dpo", "canary", share=0.2)
    assert reg.get("v2-dpo")["stage"] == "canary"
    assert reg.traffic() == pytest.approx({"v2-dpo": 0.2, "v1": 0.8})
    routed = [reg.route(f"req-{i}") for i in range(2000)]
    assert 0.15 < routed.count("v2-dpo") / len(routed) < 0.25
    assert reg.route("req-7") == reg.route("req-7")  # sticky
    reg.promote("v2-dpo", "production")
    data = reg.load()
    assert data["production"] == "v2-dpo" and data["canary"] is None
    assert reg.get("v1")["stage"] == "archived"
    back = reg.rollback()
    assert back["version"] == "v1" and reg.production()["version"] == "v1"
    assert reg.get("v2-dpo")["stage"] == "archived"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    # the file on disk is plain JSON with the full history
    on_disk = json.loads((tmp_path / "reg" / "versions.json").read_text())
    stages = [h["stage"] for h in on_disk["versions"][0]["history"]]
    assert stages == ["registered", "production", "archived", "production"]


def test_rules(tmp_path: Path, art: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register(tmp_path / "missing")
    assert not (tmp_path / "reg" / "versions.json").exists()
    reg.register(art, version="a")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(art, version="a")
    with pytest.raises(RegistryError, match="unknown stage"):
        reg.promote("a", "prod")
    with pytest.raises(RegistryError, match="unknown version"):
        reg.promote("b", "production")
    reg.promote("a", "production")
    with pytest.raises(RegistryError, match="in production"):
        reg.promote("a", "archived")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    with pytest.raises(RegistryError, match="share"):
        reg.promote("a", "production", share=0.5)


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", ".hidden", "a\\b", "x" * 65, "", "v1\n", "a..b"])
def test_version_names_are_validated(tmp_path: Path, art: Path, name: str) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="invalid version name"):
        reg.register(art, version=name)
    with pytest.raises(RegistryError, match="invalid version name"):
        reg.get(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefacts"]


def test_corrupted_file_is_reported_not_overwritten(tmp_path: Path, art: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    reg.register(art)
    bad = '{"versions": [ {"version": "v1", '  # truncated by hand
    (tmp_path / "reg" / "versions.json").write_text(bad)
    with pytest.raises(RegistryCorrupted, match="corrupted registry.*line 1"):
        reg.register(art)
    with pytest.raises(RegistryCorrupted):
        reg.versions()
    assert (tmp_path / "reg" / "versions.json").read_text() == bad
    (tmp_path / "reg" / "versions.json").write_text("[1, 2]")
    with pytest.raises(RegistryCorrupted, match="not a tunesmith registry"):
        reg.promote("v1", "production")
    assert (tmp_path / "reg" / "versions.json").read_text() == "[1, 2]"


def _writer(root: str, art: str, worker: int, n: int) -> None:
    reg = ModelRegistry(root)
    for i in range(n):
        reg.register({"adapter": art}, version=f"w{worker}-{i}", metrics={"i": i})
        if i % 3 == 0:
            reg.register({"adapter": art})  # auto-named: the numbering must not collide


def test_concurrent_writers_lose_nothing(tmp_path: Path, art: Path) -> None:
    ctx = mp.get_context("spawn")
    workers, n = 4, 12
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "reg"), str(art), w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    names = [v["version"] for v in ModelRegistry(tmp_path / "reg").versions()]
    expected_named = {f"w{w}-{i}" for w in range(workers) for i in range(n)}
    auto = [x for x in names if x not in expected_named]
    assert expected_named <= set(names)
    assert len(auto) == workers * len(range(0, n, 3)) and len(set(auto)) == len(auto)
    assert len(names) == len(set(names))
    assert not [p for p in (tmp_path / "reg").iterdir() if p.name.endswith(".tmp")]
