"""The mlflow logger against a real MLflow store (sqlite), read back with MLflow's own
API (``mlflow.search_runs``, ``MlflowClient``) and shown by MLflow's own UI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import tunesmith
from tunesmith.core.context import RunContext
from tunesmith.core.tracking import open_loggers, read_state

mlflow = pytest.importorskip("mlflow")



def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _ctx(cfg: Any, **state: Any) -> RunContext:
    run_dir = Path(cfg.resolve_path(cfg.output_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(config=cfg, run_dir=run_dir, registries=tunesmith.registry(), state=dict(state))


@pytest.fixture
def restore_uri() -> Any:
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI: put both back as they were
    (unset stays unset, or later tests would write to MLflow's default ./mlflow.db)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)  # None unsets the variable and MLflow's global


def test_params_metrics_artefacts_read_back_and_resume(tmp_path: Path, mlflow_uri: str, restore_uri: Any) -> None:
    cfg = tunesmith.validate_config({
        "name": "exp-a", "output_dir": str(tmp_path / "run"),
        "training": {"learning_rate": 2e-4, "report_to": [{"name": "mlflow", "tracking_uri": mlflow_uri, "tags": {"team": "nlp"}}]},
    })
    ctx = _ctx(cfg)
    rd = ctx.run_dir
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (rd / "data").mkdir()
    (rd / "data" / "report.md").write_text("# Data report\n")
    (rd / "final").mkdir()
    (rd / "final" / "adapter_config.json").write_text("{}")
    (rd / "final" / "adapter_model.safetensors").write_bytes(b"0" * 64)
    loggers = open_loggers(cfg, ctx.registries, ctx)
    assert loggers.names == ["mlflow", "jsonl"]
    for step in (1, 2, 3):
        loggers.log_metrics({"loss": 2.0 / step, "learning_rate": 2e-4, "epoch": step / 3, "loss/causal_lm": 1.0,
                             "note": "not a number"}, step)
    loggers.log_metrics({"eval_loss": 1.1}, 3)
    loggers.log_artifact(rd / "data" / "report.md", "data_report")
    loggers.log_artifact(rd / "final", "adapter")
    loggers.log_artifact(rd / "final", "model")  # off by default: merged models are big
    loggers.close("finished", {"train_loss": 0.9, "steps": 3, "output_path": str(rd / "final")})
    saved = read_state(rd, "mlflow")
    assert saved["tracking_uri"] == mlflow_uri and saved["experiment"] == "exp-a"
    run_id = saved["run_id"]

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["exp-a"])
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.mlflow.runName"] == "exp-a" and row["tags.team"] == "nlp"
    assert row["params.training.learning_rate"] == "0.0002" and row["params.peft.method"] == "lora"
    assert row["metrics.loss"] == pytest.approx(2.0 / 3) and row["metrics.eval_loss"] == pytest.approx(1.1)
    assert row["metrics.train_loss"] == pytest.approx(0.9)  # the result, at the last step
    assert "metrics.note" not in runs.columns and "metrics.step" not in runs.columns

    client = _client(mlflow_uri)
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in hist] == [(1, 2.0), (2, 1.0), (3, 0.6667)]
    assert [m.step for m in client.get_metric_history(run_id, "loss/causal_lm")] == [1, 2, 3]
    tops = sorted(f.path for f in client.list_artifacts(run_id))
    assert tops == ["adapter", "config", "data"]
    assert sorted(f.path for f in client.list_artifacts(run_id, "adapter")) == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = client.download_artifacts(run_id, "config/config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text())["name"] == "exp-a"
    # the artefacts of a sqlite store live beside it, not in the working directory
    assert client.get_run(run_id).info.artifact_uri.startswith((Path(mlflow_uri[10:]).parent / "mlartifacts").as_uri())

    # resume (a crashed training continues, or `tunesmith run --from evaluate`): the same MLflow run
    changed = tunesmith.validate_config({**cfg.model_dump(mode="json"), "training": {
        **cfg.model_dump(mode="json")["training"], "learning_rate": 1e-4}})
    changed._base_dir = cfg.base_dir
    ctx2 = _ctx(changed, resume=True)
    again = open_loggers(changed, ctx2.registries, ctx2)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 0.5}, 4)
    again.close("failed", None)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and len(mlflow.search_runs(experiment_names=["exp-a"])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["training.learning_rate"] == "0.0002"  # params are write-once in MLflow ...
    assert run.data.tags["tunesmith.resumed_with.training.learning_rate"] == "0.0001"  # ... the change is kept
    # a fresh (not resumed) run in the same folder is a new MLflow run
    ctx3 = _ctx(cfg)
    open_loggers(cfg, ctx3.registries, ctx3).close("finished", None)
    assert read_state(rd, "mlflow")["run_id"] != run_id


def test_tracking_uri_from_the_environment(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    cfg = tunesmith.validate_config({"output_dir": str(tmp_path / "run2"), "training": {"report_to": ["mlflow"]}})
    ctx = _ctx(cfg)
    with open_loggers(cfg, ctx.registries, ctx) as lg:
        lg.log_metrics({"loss": 1.0}, 1)
    saved = read_state(ctx.run_dir, "mlflow")
    assert saved["tracking_uri"] == mlflow_uri and saved["experiment"] == "tunesmith"
    run = _client(mlflow_uri).get_run(saved["run_id"])
    assert run.info.run_name == "run2" and run.data.metrics == {"loss": 1.0} and run.info.status == "FINISHED"


def test_bad_store_fails_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "not.db"
    bad.write_text("this is not sqlite")
    cfg = tunesmith.validate_config({"output_dir": str(tmp_path / "r"), "training": {
        "report_to": [{"name": "mlflow", "tracking_uri": f"sqlite:///{bad}"}]}})
    ctx = _ctx(cfg)
    with pytest.raises(tunesmith.core.errors.TunesmithError, match="logger 'mlflow' could not start: .*not a sqlite database"):
        open_loggers(cfg, ctx.registries, ctx)
    assert bad.read_text() == "this is not sqlite"


# --------------------------------------------------------------------------- a whole tracked run on the tiny model
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, mlflow_template_db: Path) -> dict:
    """``tunesmith run`` on the tiny model with report_to mlflow and the mlflow registry
    back-end on the same sqlite store: data, train, evaluate, export, register."""
    from tunesmith.testing import TINY_CHAT

    root = tmp_path_factory.mktemp("tracked")
    db = root / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT))
    cfg = {
        "name": "tiny-tracked",
        "model": {"source": "hf", "path": str(tiny_model_dir)},
        "data": {"path": str(data), "cleaners": [{"name": "normalize"}],
                 "split": {"train": 0.75, "validation": 0.25, "test": 0.0}},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
        "training": {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 3, "warmup_ratio": 0.0,
                     "gradient_checkpointing": False, "early_stopping": None, "lr_scheduler": "constant",
                     "precision": "fp32", "load_best_model_at_end": False,
                     "report_to": [{"name": "mlflow", "tracking_uri": uri, "experiment": "tiny-exp"}]},
        "evaluation": [{"name": "perplexity", "limit": 6}],
        "export": [{"format": "adapter"}],
        "registry": {"backend": "mlflow", "tracking_uri": uri, "path": str(root / "registry"), "name": "tiny-router",
                     "stage": "production"},
        "output_dir": str(root / "run"),
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tunesmith.reset_plugins()
    summary = tunesmith.run(tunesmith.load_config(path))
    state = read_state(root / "run", "mlflow")
    return {"uri": uri, "run_id": state["run_id"], "experiment_id": state["experiment_id"], "summary": summary,
            "root": root}


def test_pipeline_is_one_mlflow_run(tracked_run: dict) -> None:
    client = _client(tracked_run["uri"])
    run_id = tracked_run["run_id"]
    runs = client.search_runs([tracked_run["experiment_id"]])
    assert [r.info.run_id for r in runs] == [run_id]  # data, training and evaluation in one run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-tracked"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [3, 6]
    # the run directory's own record is the jsonl logger's metrics.jsonl: the same rows
    rows = [json.loads(x) for x in (tracked_run["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "train_loss" not in r] == [1, 2, 3, 4, 5, 6]
    m = run.data.metrics
    assert m["tuned.perplexity.perplexity"] < m["base.perplexity.perplexity"]  # what the evaluate stage measured
    assert "train.loss" in m and run.data.params["training.max_steps"] == "6"
    files = {f.path for top in ("config", "data", "eval", "adapter") for f in client.list_artifacts(run_id, top)}
    assert {"config/config.yaml", "data/report.md", "data/report.json", "eval/report.md", "eval/report.json",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    assert client.list_artifacts(run_id, "plots")  # the loss curve and the evaluation charts
    # the register stage put the exported adapter in the Model Registry of the same store, linked to this run
    mv = client.get_model_version_by_alias("tiny-router", "production")
    assert mv.run_id == run_id and mv.tags["tunesmith.version"] == "v1"
    assert tracked_run["summary"]["registry"]["version"] == "v1"


# --------------------------------------------------------------------------- MLflow's own dashboard
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(tracked_run: dict) -> Any:
    import httpx

    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    log = open(tracked_run["root"] / "ui.log", "w")
    proc = subprocess.Popen([str(exe), "ui", "--backend-store-uri", tracked_run["uri"], "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow ui did not start: " + (tracked_run["root"] / "ui.log").read_text()[-2000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chrome is None or not Path("/usr/bin/chromedriver").exists():
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for_text(driver: Any, texts: list[str], timeout: float = 180) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    body = {"text": ""}

    def seen(d: Any) -> bool:
        body["text"] = d.find_element(By.TAG_NAME, "body").text
        return all(t in body["text"] for t in texts)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(seen)
    except Exception as exc:  # noqa: BLE001
        missing = [t for t in texts if t not in body["text"]]
        raise AssertionError(f"not on the page: {missing}; page text: {body['text'][:1500]}") from exc
    return body["text"]


@pytest.mark.browser
def test_mlflow_ui_shows_the_run_metrics_and_artefacts(tracked_run: dict, mlflow_ui: str, browser: Any) -> None:
    exp, run_id = tracked_run["experiment_id"], tracked_run["run_id"]
    browser.get(f"{mlflow_ui}/#/experiments/{exp}/runs")
    _wait_for_text(browser, ["tiny-exp", "Training runs", "tiny-tracked"])  # the run in the experiment's run table
    browser.get(f"{mlflow_ui}/#/experiments/{exp}/runs/{run_id}")
    _wait_for_text(browser, ["tiny-tracked", "loss", "eval_loss", "tuned.perplexity.perplexity"])
    browser.get(f"{mlflow_ui}/#/experiments/{exp}/runs/{run_id}/artifacts")
    _wait_for_text(browser, ["adapter", "config", "data", "eval", "plots"])


def test_training_that_fails_and_resumes_keeps_one_mlflow_run(tiny_cfg: Any, mlflow_uri: str, tunesmith_plugin: Any,
                                                               tiny_chat_file: Path) -> None:
    """The training session drives the loggers: a run that dies at step 3 is FAILED in
    MLflow; --resume from checkpoint-2 reopens the same MLflow run and finishes it;
    metrics.jsonl and TensorBoard read as one uninterrupted run."""
    from tunesmith import hookimpl
    from tunesmith.core.session import train

    class Crash:
        armed = True

        @hookimpl
        def after_log(self, run: Any, step: int, logs: dict) -> None:
            if self.armed and step == 3 and "loss" in logs:
                raise RuntimeError("power cut")

    crash = Crash()
    tunesmith_plugin(crash, "crash")
    cfg = tiny_cfg(name="resumable", training={"max_steps": 4, "save_steps": 2, "logging_steps": 1, "eval_steps": 2,
                                                "report_to": ["tensorboard", {"name": "mlflow", "tracking_uri": mlflow_uri}]},
                   data={"path": str(tiny_chat_file), "validation_path": str(tiny_chat_file)})
    regs = tunesmith.registry()
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, regs)
    run_dir = Path(cfg.output_dir)
    run_id = read_state(run_dir, "mlflow")["run_id"]
    client = _client(mlflow_uri)
    assert client.get_run(run_id).info.status == "FAILED"
    crash.armed = False
    result = train(cfg, regs, resume=True)
    assert result["resumed_from"].endswith("checkpoint-2") and result["steps"] == 4
    assert read_state(run_dir, "mlflow")["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train_loss"] == pytest.approx(result["train_loss"])
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 3, 4]  # MLflow keeps every point
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [2, 4]
    assert {f.path for f in client.list_artifacts(run_id, "adapter")} >= {"adapter/adapter_model.safetensors"}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "train_loss" not in r] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # the dead run's step 3 purged
