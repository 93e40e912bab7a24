"""The model registry on every back-end: stages, rollback, routing, the CLI, concurrency
across processes, corruption.

One suite, three stores: ``local`` (versions.json), ``mlflow`` (MLflow Model Registry
on a sqlite file) and ``mlflow-server`` (an ``mlflow server`` on 127.0.0.1 that the
session starts). The store-specific checks read each store the way its own tools do
(the JSON file; MlflowClient: aliases and tags).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunesmith.model_registry import open_registry
from tunesmith.model_registry.state import RegistryCorrupted, RegistryError


@dataclass
class Store:
    """How a test reaches one back-end."""

    kind: str  # local | mlflow | mlflow-server
    options: dict = field(default_factory=dict)

    @property
    def plugin(self) -> str:
        return "local" if self.kind == "local" else "mlflow"

    def open(self, root: Path):  # type: ignore[no-untyped-def]
        return open_registry(root, self.plugin, dict(self.options))

    def cli(self) -> list[str]:
        out = ["--backend", self.plugin]
        for k, v in self.options.items():
            out += ["--option", f"{k}={v}"]
        return out

    def client(self, reg):  # type: ignore[no-untyped-def]
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=reg.tracking_uri, registry_uri=reg.registry_uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite store, built once and copied for each test."""
    pytest.importorskip("mlflow")
    from tunesmith.model_registry.mlflow_store import make_client

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    make_client(f"sqlite:///{db}")
    return db


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path):  # type: ignore[no-untyped-def]
    """``mlflow server`` on 127.0.0.1 (its own sqlite store and artefact folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, root / "server.db")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
        time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start in 90 s")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(params=["local", "mlflow", "mlflow-server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store("local")
    template = request.getfixturevalue("mlflow_template")
    if request.param == "mlflow":  # the default store: sqlite:///<registry folder>/mlflow.db
        (tmp_path / "reg").mkdir()
        shutil.copy(template, tmp_path / "reg" / "mlflow.db")
        return Store("mlflow")
    url = request.getfixturevalue("mlflow_server")
    return Store("mlflow-server", {"tracking_uri": url, "model_name": f"m-{uuid.uuid4().hex[:10]}"})


@pytest.fixture
def art(tmp_path: Path) -> Path:
    p = tmp_path / "artefacts" / "adapter"
    p.mkdir(parents=True)
    (p / "adapter_config.json").write_text("{}")
    return p


def test_register_promote_rollback(store: Store, tmp_path: Path, art: Path) -> None:
    reg = store.open(tmp_path / "reg")
    v1 = reg.register(art, metrics={"ppl": 3.2}, config_hash="abc", base_model="smollm2", metadata={"note": "first"})
    assert v1["version"] == "v1" and v1["artifacts"] == {"adapter": str(art.resolve())} and v1["stage"] == "registered"
    assert v1["metrics"] == {"ppl": 3.2} and v1["metadata"] == {"note": "first"} and v1["config_hash"] == "abc"
    reg.register({"adapter": art}, version="v2-dpo")
    assert reg.production() is None and reg.current_path() is None
    reg.promote("v1", "production")
    assert reg.production()["version"] == "v1" and reg.current_path() == art.resolve()
    assert reg.current_path("adapter") == art.resolve()
    with pytest.raises(RegistryError, match="no 'gguf' artefact"):
        reg.current_path("gguf")
    reg.promote("v2-dpo", "canary", share=0.2)
    assert reg.get("v2-dpo")["stage"] == "canary"
    assert reg.traffic() == pytest.approx({"v2-dpo": 0.2, "v1": 0.8})
    data = reg.load()
    routed = [reg.route_in(data, f"req-{i}") for i in range(2000)]
    assert 0.15 < routed.count("v2-dpo") / len(routed) < 0.25
    assert reg.route("req-7") == reg.route("req-7") == reg.route_in(data, "req-7")  # sticky
    reg.promote("v2-dpo", "production")
    data = reg.load()
    assert data["production"] == "v2-dpo" and data["canary"] is None
    assert reg.get("v1")["stage"] == "archived"
    back = reg.rollback()
    assert back["version"] == "v1" and reg.production()["version"] == "v1"
    assert reg.get("v2-dpo")["stage"] == "archived"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    stages = [h["stage"] for h in reg.get("v1")["history"]]
    assert stages == ["registered", "production", "archived", "production"]
    # a second handle (another process would do the same) sees the same state
    again = store.open(tmp_path / "reg").load()
    assert again["production"] == "v1" and [v["version"] for v in again["versions"]] == ["v1", "v2-dpo"]
    # the store itself, read with its own tools
    if store.kind == "local":
        on_disk = json.loads((tmp_path / "reg" / "versions.json").read_text())
        assert [h["stage"] for h in on_disk["versions"][0]["history"]] == stages
    else:
        client = store.client(reg)
        rm = client.get_registered_model(reg.model_name)
        assert {k: int(v) for k, v in rm.aliases.items()} == {"production": 1}  # MLflow aliases are the stage pointers
        assert client.get_model_version_by_alias(reg.model_name, "production").tags["tunesmith.version"] == "v1"
        mv2 = client.get_model_version(reg.model_name, "2")
        assert mv2.tags["tunesmith.stage"] == "archived" and mv2.tags["tunesmith.version"] == "v2-dpo"
        mv1 = client.get_model_version(reg.model_name, "1")
        assert mv1.tags["metric.ppl"] == "3.2"
        if store.kind == "mlflow-server":  # a server gets the files, not this machine's paths
            assert mv1.source.startswith("runs:/") and v1["mlflow"]["run_id"]
            files = [f.path for f in client.list_artifacts(v1["mlflow"]["run_id"], "registry/adapter")]
            assert files == ["registry/adapter/adapter_config.json"]
        else:
            assert mv1.source == str(art.resolve())


def test_rules(store: Store, tmp_path: Path, art: Path) -> None:
    reg = store.open(tmp_path / "reg")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register(tmp_path / "missing")
    assert reg.versions() == []
    if store.kind == "local":
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
    reg.register(art, version="b", stage="staging")
    assert reg.load()["staging"] == "b" and reg.traffic() == pytest.approx({"b": 0.1, "a": 0.9})
    assert [v["version"] for v in reg.versions()] == ["a", "b"]


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", ".hidden", "a\\b", "x" * 65, "", "v1\n", "a..b"])
def test_version_names_are_validated(tmp_path: Path, art: Path, name: str) -> None:
    from tunesmith.model_registry.local import ModelRegistry

    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="invalid version name"):
        reg.register(art, version=name)
    with pytest.raises(RegistryError, match="invalid version name"):
        reg.get(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefacts"]


def test_version_names_are_validated_by_every_backend(store: Store, tmp_path: Path, art: Path) -> None:
    reg = store.open(tmp_path / "reg")
    for name in ("../evil", "a/b", "x" * 65, "v1\n"):
        with pytest.raises(RegistryError, match="invalid version name"):
            reg.register(art, version=name)
    assert reg.versions() == []
    if store.kind != "local":  # nothing reached MLflow either
        client = store.client(reg)
        assert not client.search_model_versions(f"name='{reg.model_name}'")


def test_corrupted_store_is_reported_not_overwritten(store: Store, tmp_path: Path, art: Path) -> None:
    reg = store.open(tmp_path / "reg")
    reg.register(art)
    if store.kind == "local":
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
        return
    # the registry state tag broken by hand (an MLflow UI edit gone wrong)
    client = store.client(reg)
    client.set_registered_model_tag(reg.model_name, "tunesmith.state", '{"shares": {"canary": 0.05,')
    with pytest.raises(RegistryCorrupted, match="corrupted registry.*tunesmith.state"):
        reg.register(art)
    with pytest.raises(RegistryCorrupted):
        reg.promote("v1", "production")
    with pytest.raises(RegistryCorrupted):
        reg.versions()
    assert client.get_registered_model(reg.model_name).tags["tunesmith.state"] == '{"shares": {"canary": 0.05,'
    assert len(client.search_model_versions(f"name='{reg.model_name}'")) == 1 and not client.get_registered_model(
        reg.model_name).aliases
    # a version entry broken by hand
    client.set_registered_model_tag(reg.model_name, "tunesmith.state", "{}")
    client.set_model_version_tag(reg.model_name, "1", "tunesmith.entry", "{oops")
    with pytest.raises(RegistryCorrupted, match="version 1"):
        reg.promote("v1", "production")
    assert client.get_model_version(reg.model_name, "1").tags["tunesmith.entry"] == "{oops"
    if store.kind == "mlflow":
        # the database file itself: garbage, or a sqlite file that is not an MLflow store
        db = tmp_path / "reg" / "mlflow.db"
        db.write_bytes(b"\x00garbage, not a database" * 40)
        before = db.read_bytes()
        fresh = store.open(tmp_path / "reg")
        with pytest.raises(RegistryCorrupted, match="not a sqlite database"):
            fresh.register(art)
        with pytest.raises(RegistryCorrupted):
            fresh.versions()
        assert db.read_bytes() == before
        import sqlite3

        db.unlink()
        con = sqlite3.connect(db)
        con.execute("create table notes (x text)")
        con.commit()
        con.close()
        before = db.read_bytes()
        with pytest.raises(RegistryCorrupted, match="not an MLflow store"):
            store.open(tmp_path / "reg").register(art)
        assert db.read_bytes() == before


def _writer(plugin: str, options: dict, root: str, art: str, worker: int, n: int) -> None:
    reg = open_registry(root, plugin, options)
    for i in range(n):
        reg.register({"adapter": art}, version=f"w{worker}-{i}", metrics={"i": i})
        if i % 3 == 0:
            reg.register({"adapter": art})  # auto-named: the numbering must not collide
    reg.register({"adapter": art}, version="contested")  # every worker tries; exactly one wins


def _contested(plugin: str, options: dict, root: str, art: str, worker: int, n: int) -> None:
    try:
        _writer(plugin, options, root, art, worker, n)
    except RegistryError as exc:
        if "already registered" not in str(exc):
            raise
        Path(root, f"lost-{worker}").parent.mkdir(parents=True, exist_ok=True)
        Path(root, f"lost-{worker}").write_text(str(exc))


def test_concurrent_writers_lose_nothing(store: Store, tmp_path: Path, art: Path) -> None:
    ctx = mp.get_context("spawn")
    workers = 4
    n = 12 if store.kind == "local" else 6
    root = tmp_path / "reg"
    procs = [ctx.Process(target=_contested, args=(store.plugin, store.options, str(root), str(art), w, n))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    reg = store.open(root)
    names = [v["version"] for v in reg.versions()]
    expected_named = {f"w{w}-{i}" for w in range(workers) for i in range(n)}
    auto = [x for x in names if x not in expected_named and x != "contested"]
    assert expected_named <= set(names)
    assert len(auto) == workers * len(range(0, n, 3)) and len(set(auto)) == len(auto)
    assert names.count("contested") == 1 and len(list(root.glob("lost-*"))) == workers - 1
    assert len(names) == len(set(names))
    assert all(reg.get(f"w{w}-{i}")["metrics"] == {"i": i} for w in range(workers) for i in range(n))
    # the shared state is a read-modify-write under the back-end's lock: no writer's event is lost
    registered = [e["version"] for e in reg.load()["events"] if e["event"] == "register"]
    assert sorted(registered) == sorted(names)
    if store.kind == "local":
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    else:  # the losers' MLflow versions were deleted again: one model version per tunesmith version
        assert len(store.client(reg).search_model_versions(f"name='{reg.model_name}'")) == len(names)


# --------------------------------------------------------------------------- the same commands on every back-end
def _run_dir(tmp_path: Path, art: Path) -> Path:
    run = tmp_path / "runs" / "r1"
    (run / "final").mkdir(parents=True)
    (run / "final" / "tunesmith.json").write_text(json.dumps({"base_model_dir": "/models/tiny", "peft": {"method": "lora"},
                                                               "objective": "sft"}))
    shutil.copytree(art, run / "exports" / "adapter")
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"metrics": {"perplexity": {"perplexity": 3.5}}}))
    return run


def test_cli_on_every_backend(store: Store, tmp_path: Path, art: Path) -> None:
    from click.testing import CliRunner

    from tunesmith.cli import cli

    runner = CliRunner()
    base = ["-r", str(tmp_path / "reg"), *store.cli()]

    def call(*args: str, ok: bool = True):  # type: ignore[no-untyped-def]
        res = runner.invoke(cli, ["registry", *args, *base], catch_exceptions=True)
        if ok:
            assert res.exit_code == 0, (res.output, res.exception)
        return res

    run = _run_dir(tmp_path, art)
    out = json.loads(call("register", str(run), "--metric", "accuracy=0.82", "--meta", "owner=alice", "--json").output)
    assert out["version"] == "v1" and out["metrics"] == {"perplexity.perplexity": 3.5, "accuracy": 0.82}
    assert out["metadata"]["owner"] == "alice" and out["base_model"] == "/models/tiny"
    assert out["artifacts"] == {"adapter": str((run / "exports" / "adapter").resolve())}
    call("register", str(art), "--version", "support-v2")
    call("promote", "v1", "production")
    assert "support-v2 -> canary" in call("promote", "support-v2", "canary", "--share", "0.25").output
    listed = json.loads(call("list", "--json").output)
    assert listed["production"] == "v1" and listed["canary"] == "support-v2"
    assert listed["traffic"] == pytest.approx({"support-v2": 0.25, "v1": 0.75})
    assert listed["backend"] == store.plugin
    table = call("list").output
    assert "support-v2" in table and "canary" in table and "25%" in table
    assert json.loads(call("show", "--json").output)["version"] == "v1"
    assert json.loads(call("path", "--json").output)["path"] == str((run / "exports" / "adapter").resolve())
    assert call("path").output.strip() == str((run / "exports" / "adapter").resolve())
    routed = json.loads(call("route", "a", "b", "c", "--json").output)
    assert set(routed.values()) <= {"v1", "support-v2"}
    call("promote", "support-v2", "production")
    assert "production is now v1" in call("rollback").output
    bad = call("promote", "nope", "production", ok=False)
    assert bad.exit_code != 0 and "unknown version 'nope'" in str(bad.exception)


def test_pipeline_register_stage_uses_the_backend(tmp_path: Path, art: Path, mlflow_template: Path) -> None:
    """``registry: {backend: mlflow, ...}`` in a config: the register stage goes through the plugin."""
    import tunesmith
    from tunesmith.core.context import RunContext
    from tunesmith.core.pipeline import stage_register
    from tunesmith.core.rundir import RunDir

    run = _run_dir(tmp_path, art)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    cfg = tunesmith.validate_config({"output_dir": str(run), "registry": {
        "backend": "mlflow", "path": str(tmp_path / "registry"), "name": "router", "stage": "production",
        "tracking_uri": f"sqlite:///{db}"}})
    res = stage_register(cfg, tunesmith.registry(), RunDir(run), RunContext(config=cfg, run_dir=run), False)
    assert res["version"] == "v1" and res["stage"] == "production" and res["backend"] == "mlflow"
    reg = open_registry(tmp_path / "registry" / "router", "mlflow", {"tracking_uri": f"sqlite:///{db}"})
    assert reg.model_name == "router" and reg.production()["version"] == "v1"
    with pytest.raises(tunesmith.core.errors.ConfigError, match="registry.tracking_urii"):
        tunesmith.validate_config({"registry": {"backend": "mlflow", "tracking_urii": "x"}})
    with pytest.raises(tunesmith.core.errors.ConfigError, match="unknown registry back-end 'nosuch'"):
        tunesmith.validate_config({"registry": {"backend": "nosuch"}})


# --------------------------------------------------------------------------- the server lock
def test_server_lock_excludes_and_breaks_a_dead_writers_lock(mlflow_server: str) -> None:
    """Against an ``mlflow server`` the registry lock is a registered model that one
    writer creates: a second writer waits (and times out), and a lock left by a writer
    that died is broken once it has stayed unchanged for ``stale_after`` seconds."""
    import threading

    from tunesmith.model_registry.mlflow_store import ServerLock, make_client

    client = make_client(mlflow_server)
    name = f"lock-{uuid.uuid4().hex[:8]}"
    holder = ServerLock(client, name, timeout=5)
    with holder:
        assert client.get_registered_model(name).tags["tunesmith.lock"] == holder.owner
        with pytest.raises(TimeoutError):
            with ServerLock(client, name, timeout=0.5, stale_after=60):
                pass
    # released: the lock model is gone, and many threads take it in turn, never two at once
    assert not client.search_registered_models(f"name='{name}'")
    inside, peak, order = [0], [0], []
    guard = threading.Lock()

    def work(k: int) -> None:
        with ServerLock(make_client(mlflow_server), name, timeout=60):
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            order.append(k)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(order) == list(range(6)) and peak[0] == 1
    # a writer that died holding the lock (the model exists, nobody deletes it)
    client.create_registered_model(name, tags={"tunesmith.lock": "dead-host:1"})
    t0 = time.monotonic()
    with ServerLock(client, name, timeout=30, stale_after=1.0) as lock:
        waited = time.monotonic() - t0
        assert client.get_registered_model(name).tags["tunesmith.lock"] == lock.owner
    assert 1.0 <= waited < 30
