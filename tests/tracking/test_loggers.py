"""Loggers as plugins: selection (report_to), the LoggerSet contract, jsonl and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tunesmith
from tunesmith import hookimpl
from tunesmith.core.context import RunContext
from tunesmith.core.errors import ConfigError, TunesmithError
from tunesmith.core.tracking import LoggerSet, active, flatten, open_loggers


class Recorder:
    """A logger that records every call (and can be told to fail)."""

    description = "records calls"

    def __init__(self, name: str, fail_in: str | None = None) -> None:
        self.name = name
        self.fail_in = fail_in
        self.calls: list[tuple] = []
        self.opened: list[bool] = []

    def open(self, run: Any, options: Any, resume: bool) -> Any:
        if self.fail_in == "open":
            raise RuntimeError("tracking server down")
        self.opened.append(resume)
        rec = self

        class Run:
            def _do(self, what: str, *args: Any) -> None:
                rec.calls.append((what, *args))
                if rec.fail_in == what:
                    raise RuntimeError(f"{what} broke")

            def log_params(self, params: dict) -> None:
                self._do("log_params", params)

            def log_metrics(self, metrics: dict, step: int) -> None:
                self._do("log_metrics", metrics, step)

            def log_artifact(self, path: Any, kind: str) -> None:
                self._do("log_artifact", Path(path).name, kind)

            def close(self, status: str, result: dict | None) -> None:
                self._do("close", status, result)

        return Run()


def _plugin(*loggers: Recorder) -> Any:
    class P:
        @hookimpl
        def register_loggers(self, register: Any) -> None:
            for lg in loggers:
                register(lg)

    return P()


def _ctx(cfg: Any) -> RunContext:
    run_dir = Path(cfg.resolve_path(cfg.output_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(config=cfg, run_dir=run_dir, registries=tunesmith.registry())


def _cfg(tmp_path: Path, **training: Any) -> Any:
    return tunesmith.validate_config({"name": "t", "output_dir": str(tmp_path / "run"), "training": training})


def test_loggerset_fans_out_nests_and_survives_a_failing_logger(tmp_path: Path, tunesmith_plugin: Any,
                                                                 capsys: pytest.CaptureFixture) -> None:
    rec, bad = Recorder("rec"), Recorder("bad", fail_in="log_metrics")
    tunesmith_plugin(_plugin(rec, bad), "recorders")
    cfg = _cfg(tmp_path, report_to=["rec", "bad"], learning_rate=3e-4)
    ctx = _ctx(cfg)
    (ctx.run_dir / "config.yaml").write_text("x: 1\n")
    loggers = open_loggers(cfg, ctx.registries, ctx)
    assert loggers.names == ["rec", "bad", "jsonl"]  # report_to's order, then the always-on jsonl
    assert rec.opened == [False]
    params = rec.calls[0][1]
    assert rec.calls[0][0] == "log_params" and params["training.learning_rate"] == 3e-4 and params["peft.method"] == "lora"
    assert rec.calls[1] == ("log_artifact", "config.yaml", "config")
    loggers.log_metrics({"loss": 1.5, "step": 1, "epoch": 0.1}, step=1)
    assert "logger 'bad' failed in log_metrics and is switched off" in capsys.readouterr().err
    assert loggers.names == ["rec", "jsonl"] and len(loggers.errors) == 1
    assert ("close", "failed", None) in bad.calls  # released what it held
    # a nested open for the same run (the training session inside `tunesmith run`) joins the set
    inner = open_loggers(cfg, ctx.registries, RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries))
    assert inner.names == ["rec", "jsonl"] and rec.opened == [False]
    inner.log_metrics({"loss": 1.2}, step=2)
    inner.close("finished", {"x": 1})  # the owner closes, not the nested view
    assert not loggers.closed and active(ctx.run_dir) is loggers
    loggers.log_artifact(ctx.run_dir / "missing.png", "plot")  # skipped
    loggers.log_artifact(ctx.run_dir / "config.yaml", "config")  # already logged: once
    with pytest.raises(ValueError, match="unknown artefact kind"):
        loggers.log_artifact(ctx.run_dir / "config.yaml", "weights")
    loggers.close("finished", {"train_loss": 1.2})
    loggers.close("failed", None)  # idempotent
    assert [c for c in rec.calls if c[0] != "log_params"] == [
        ("log_artifact", "config.yaml", "config"),
        ("log_metrics", {"loss": 1.5, "epoch": 0.1}, 1),
        ("log_metrics", {"loss": 1.2}, 2),
        ("close", "finished", {"train_loss": 1.2}),
    ]
    assert active(ctx.run_dir) is None
    rows = [json.loads(x) for x in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 1.2)]


def test_opening_failure_is_an_error_and_other_ranks_log_nothing(tmp_path: Path, tunesmith_plugin: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rec, down = Recorder("rec"), Recorder("down", fail_in="open")
    tunesmith_plugin(_plugin(rec, down), "recorders")
    cfg = _cfg(tmp_path, report_to=["rec", "down"])
    ctx = _ctx(cfg)
    with pytest.raises(TunesmithError, match="logger 'down' could not start: RuntimeError: tracking server down"):
        open_loggers(cfg, ctx.registries, ctx)
    assert rec.calls[-1] == ("close", "failed", None) and active(ctx.run_dir) is None
    monkeypatch.setenv("RANK", "1")
    other = open_loggers(cfg, ctx.registries, ctx)
    assert isinstance(other, LoggerSet) and not other and other.names == []
    other.log_metrics({"loss": 1.0}, 1)
    other.close("finished", None)
    assert not (ctx.run_dir / "metrics.jsonl").exists()


def test_report_to_forms_and_errors(tmp_path: Path) -> None:
    regs = tunesmith.registry()
    p = tmp_path / "run.yaml"
    p.write_text("name: x\ntraining:\n  max_steps: 3\n  report_to:\n    - tensorboard\n    - nosuch\n")
    with pytest.raises(ConfigError) as err:
        tunesmith.load_config(p, registries=regs)
    msg = str(err.value)
    assert msg.startswith(f"{p}:6: training.report_to.1.name: unknown logger 'nosuch'")
    assert "available: jsonl, mlflow, tensorboard, wandb" in msg
    p.write_text("training:\n  report_to:\n    - {name: mlflow, tracking_ur: sqlite:///x.db}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: training.report_to.0.tracking_ur: unknown key 'tracking_ur'; did you mean 'tracking_uri'"):
        tunesmith.load_config(p, registries=regs)
    for value, names in (("mlflow", ["mlflow"]), ("none", []), ("[]", []), ("[wandb, {name: tensorboard, flush_secs: 5}]",
                                                                           ["wandb", "tensorboard"])):
        p.write_text(f"training:\n  report_to: {value}\n")
        cfg = tunesmith.load_config(p, registries=regs)
        assert [s.name for s in cfg.training.report_to] == names
    assert cfg.training.report_to[1].options.flush_secs == 5 and "tensorboard" in cfg.training.report_to
    p.write_text("name: x\n")
    assert tunesmith.load_config(p, registries=regs).training.report_to is None  # the loggers on by default
    # the command line says the same, on one line, exit status 2
    p.write_text("training:\n  report_to: [nosuch]\n")
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "tunesmith"
    res = subprocess.run([str(exe), "config", "validate", str(p)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[0].startswith(f"error: {p}:2: training.report_to.0.name")
    assert "unknown logger 'nosuch' (available: jsonl, mlflow, tensorboard, wandb)" in res.stderr


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": [{"name": "x"}], "e": {}}, "f": None}) == {
        "a.b": 1, "a.c": "[1, 2]", "a.d.0.name": "x", "a.e": "{}", "f": None}


def test_jsonl_rows_and_resume(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, report_to=[])
    ctx = _ctx(cfg)
    with open_loggers(cfg, ctx.registries, ctx) as lg:
        assert lg.names == ["jsonl"]
        for s in (1, 2, 3, 4):
            lg.log_metrics({"loss": 1.0 / s, "epoch": s / 4, "note": "text", "bad": float("nan")}, s)
        lg.log_metrics({"eval_loss": 0.9}, 4)
    path = ctx.run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and rows[-1]["eval_loss"] == 0.9
    assert rows[0]["note"] == "text" and rows[0]["bad"] == "nan" and "time_s" in rows[0]
    # resumed from the checkpoint at step 2 (the session says so): rows 3, 4 of the killed run are replaced
    ctx2 = RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries, state={"resume": True, "resume_step": 2})
    with open_loggers(cfg, ctx2.registries, ctx2) as lg:
        lg.log_metrics({"loss": 0.33}, 3)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.33)]
    # resumed without being told the step: the newest complete checkpoint
    (ctx.run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (ctx.run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (ctx.run_dir / "checkpoints" / "checkpoint-3").mkdir()  # incomplete: no trainer state
    ctx3 = RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries, state={"resume": True})
    with open_loggers(cfg, ctx3.registries, ctx3) as lg:
        lg.log_metrics({"loss": 0.6}, 2)
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2]
    # a later pipeline stage that reopens the run but logs no rows keeps the file as it is
    before = path.read_text()
    with open_loggers(cfg, ctx.registries, RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries), resume=True):
        pass
    assert path.read_text() == before
    # a fresh run starts a fresh file
    with open_loggers(cfg, ctx.registries, RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries)) as lg:
        lg.log_metrics({"loss": 2.0}, 1)
    assert [r["loss"] for r in map(json.loads, path.read_text().splitlines())] == [2.0]


def _scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return {t: [(e.step, round(e.value, 6)) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}, acc


def test_tensorboard_scalars_text_images_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = _cfg(tmp_path)  # report_to unset: tensorboard is on by default
    ctx = _ctx(cfg)
    (ctx.run_dir / "config.yaml").write_text("training:\n  max_steps: 3\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([1, 2])
    fig.savefig(ctx.run_dir / "loss.png")
    plt.close(fig)
    with open_loggers(cfg, ctx.registries, ctx) as lg:
        assert lg.names == ["tensorboard", "jsonl"]
        for s in (1, 2, 3):
            lg.log_metrics({"loss": 3.0 - s, "learning_rate": 1e-3, "epoch": s / 3, "loss/causal_lm": 1.0}, s)
        lg.log_metrics({"eval_loss": 1.25}, 3)
        lg.log_artifact(ctx.run_dir / "loss.png", "plot")
    scalars, acc = _scalars(ctx.run_dir / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert scalars["eval/loss"] == [(3, 1.25)] and scalars["loss/causal_lm"][0] == (1, 1.0)
    assert "train/epoch" in scalars
    assert "config/config.yaml/text_summary" in acc.Tags()["tensors"]  # the config in the Text tab
    assert acc.Tags()["images"] == ["plots/loss"]
    # resumed from step 1: the killed run's steps 2 and 3 are purged from the curves
    ctx2 = RunContext(config=cfg, run_dir=ctx.run_dir, registries=ctx.registries, state={"resume": True, "resume_step": 1})
    with open_loggers(cfg, ctx2.registries, ctx2) as lg:
        lg.log_metrics({"loss": 9.0}, 2)
    scalars, _ = _scalars(ctx.run_dir / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.0), (2, 9.0)]
