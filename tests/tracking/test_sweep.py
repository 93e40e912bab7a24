"""Sweeps on Optuna: search spaces, a tiny-model sweep that is killed and resumed, pruning
through the after_log hook, the report, the best config, registering the best trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunesmith.core.errors import ConfigError
from tunesmith.sweep.space import load_space, parse_space, with_params

optuna = pytest.importorskip("optuna")

TUNESMITH = str(Path(sys.executable).parent / "tunesmith")


def test_space_forms_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "space.yaml"
    p.write_text("training:\n  learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n  batch_size: {int: [2, 8, 2]}\n"
                 "peft.r: {choice: [4, 8, 16]}\npeft.dropout: [0.0, 0.1]\ntraining.warmup_ratio: {uniform: [0, 0.1]}\n")
    params = {x.key: x for x in load_space(p)}
    assert set(params) == {"training.learning_rate", "training.batch_size", "peft.r", "peft.dropout", "training.warmup_ratio"}
    assert params["training.learning_rate"].kind == "loguniform" and params["training.batch_size"].step == 2
    assert params["peft.dropout"].choices == (0.0, 0.1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    t = study.ask()
    values = {k: x.suggest(t) for k, x in params.items()}
    assert 1e-5 <= values["training.learning_rate"] <= 1e-3 and values["training.batch_size"] in (2, 4, 6, 8)
    assert values["peft.r"] in (4, 8, 16)
    data = with_params({"training": {"max_steps": 3}, "peft": {"method": "lora"}}, values)
    assert data["training"]["max_steps"] == 3 and data["peft"]["r"] == values["peft.r"]
    for text, msg in (
        ("training.learning_rate: {loguniform: [0, 1.0e-3]}\n", r"space.yaml:1: training.learning_rate: loguniform needs low > 0"),
        ("a: 1\nb:\n  c: {uniform: [2, 1]}\n", r"space.yaml:1: a: expected a distribution"),
        ("b:\n  c: {uniform: [2, 1]}\n", r"space.yaml:2: b.c: uniform: low must be below high"),
        ("peft.r: {int: [1.5, 4]}\n", "int takes whole numbers"),
        ("peft.r: {normal: [1, 4]}\n", r"space.yaml:1: peft.r: unknown distribution 'normal'"),
        ("peft.r: {choice: []}\n", "choice takes a non-empty list"),
        ("[1, 2]\n", "space.yaml:1: the top level must be a mapping"),
        ("{}\n", "a search space is a mapping"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_space(p)
    assert parse_space({"x": {"logint": [1, 100]}})[0].sample_values() == [1, 100]


def _write_setup(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path, Path]:
    from tunesmith.testing import TINY_CHAT

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT))
    cfg = {
        "name": "tiny-sweep",
        "model": {"source": "hf", "path": str(tiny_model_dir)},
        # relative paths: best.yaml makes them absolute; prepared once for all trials (OUT/data)
        "data": {"path": "data/chat.jsonl", "validation_path": "data/chat.jsonl", "cleaners": [{"name": "normalize"}],
                 "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
        "training": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 8, "gradient_accumulation_steps": 1,
                     "max_length": 48, "logging_steps": 1, "save_steps": 2, "eval_steps": 1, "eval_batch_size": 24,
                     "warmup_ratio": 0.0, "gradient_checkpointing": False, "early_stopping": None,
                     "lr_scheduler": "constant", "precision": "fp32", "load_best_model_at_end": False, "report_to": []},
        "registry": {"path": "registry", "name": "tiny-best"},
        "output_dir": "runs/tiny",
    }
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    space = tmp_path / "space.yaml"
    space.write_text("training.learning_rate: {choice: [3.0e-2, 1.0e-2, 1.0e-7]}\npeft.r: {choice: [2, 4]}\n")
    # known values first: two good ones, then a learning rate that cannot learn (the pruner stops it), then another
    enqueue = tmp_path / "first.yaml"
    enqueue.write_text(yaml.safe_dump([
        {"training.learning_rate": 3e-2, "peft.r": 2}, {"training.learning_rate": 3e-2, "peft.r": 4},
        {"training.learning_rate": 1e-7, "peft.r": 2}, {"training.learning_rate": 1e-2, "peft.r": 2}]))
    return config, space, enqueue


def _env() -> dict:
    return dict(os.environ, TUNESMITH_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


def test_sweep_killed_after_two_trials_resumes_to_four(tmp_path: Path, tiny_model_dir: Path) -> None:
    config, space, enqueue = _write_setup(tmp_path, tiny_model_dir)
    out = tmp_path / "sweep-out"
    args = [TUNESMITH, "sweep", str(config), "--space", str(space), "--trials", "4", "-o", str(out),
            "--enqueue", str(enqueue), "--prune-startup-trials", "2"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    try:
        while not (out / "trials" / "trial-002").exists():  # trials 0 and 1 are done, trial 2 has started
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the sweep did not reach its third trial"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        log.close()
    study = optuna.load_study(study_name="tiny-sweep", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states[:3] == ["COMPLETE", "COMPLETE", "RUNNING"], states  # killed in the middle of trial 2

    res = subprocess.run([*args, "--register", "--json"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "trial(s) 2 were interrupted and run again" in res.stderr
    report = json.loads(res.stdout)
    rows = {r["trial"]: r for r in report["trials"]}
    counts = report["counts"]
    assert counts["complete"] + counts["pruned"] == 4 and counts["interrupted"] == 1  # 4 trials in total
    assert counts["complete"] >= 2 and counts["pruned"] >= 1 and counts["failed"] == counts["running"] == counts["waiting"] == 0
    assert rows[0]["state"] == rows[1]["state"] == "complete" and rows[2]["state"] == "interrupted"
    # the interrupted trial ran again with the same values, in the same run directory
    retry = next(r for r in rows.values() if r.get("retry_of") == 2)
    assert retry["params"] == rows[2]["params"] == {"training.learning_rate": 1e-7, "peft.r": 2}
    assert retry["run_dir"] == rows[2]["run_dir"]
    # ... and the pruner stopped it through the after_log hook: it could not learn
    assert retry["state"] == "pruned" and retry["steps"] < 4 and "pruned by the sweep" in retry["stop_reason"]
    steps_logged = [json.loads(x)["step"] for x in (Path(retry["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_logged) < 4
    for r in rows.values():
        if r["state"] == "complete":
            assert r["steps"] == 4 and (Path(r["run_dir"]) / "final" / "adapter_model.safetensors").exists()
            assert r["value"] == pytest.approx(r["eval_loss"]) and not (Path(r["run_dir"]) / "checkpoints").exists()
            assert sorted(int(s) for s in r["intermediate"]) == [1, 2, 3, 4]  # an evaluation each step, reported to Optuna
    best = report["best"]
    assert best["value"] == min(r["value"] for r in rows.values() if r["state"] == "complete")
    assert best["params"]["training.learning_rate"] > 1e-7
    # the best config: the base config with the best values, paths absolute, ready to run
    import tunesmith

    best_cfg = tunesmith.load_config(out / "best.yaml")
    assert best_cfg.training.learning_rate == best["params"]["training.learning_rate"]
    assert best_cfg.peft.options.r == best["params"]["peft.r"]
    assert best_cfg.data.path == str((tmp_path / "data" / "chat.jsonl").resolve())
    assert best_cfg.output_dir == str((tmp_path / "runs" / "tiny").resolve())
    assert json.loads((out / "best.json").read_text())["trial"] == best["trial"]
    for name in ("history", "importance", "intermediate"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["counts"] == report["counts"]
    # every trial trained and evaluated on the one split the sweep prepared
    assert (out / "data" / "train.jsonl").read_text() == (Path(rows[0]["run_dir"]) / "data" / "train.jsonl").read_text()
    assert len((out / "data" / "validation.jsonl").read_text().splitlines()) == 24
    # --register: the best trial's model is in the config's registry
    from tunesmith.model_registry.local import ModelRegistry

    entry = ModelRegistry(tmp_path / "registry" / "tiny-best").get(report["registered"]["version"])
    assert entry["metrics"]["eval_loss"] == pytest.approx(best["value"]) and entry["metadata"]["trial"] == best["trial"]
    assert entry["artifacts"] == {"final": str(Path(best["run_dir"]).resolve() / "final")}

    # run again: nothing left to train, the same table
    again = subprocess.run([TUNESMITH, "sweep", str(config), "--space", str(space), "--trials", "4", "-o", str(out)],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert f"{counts['complete']} complete, {counts['pruned']} pruned, 0 failed, 1 interrupted" in again.stdout
    assert "trial " not in again.stderr.replace("trial(s)", "")  # no trial ran
    # a different space in the same folder is refused
    other = tmp_path / "other.yaml"
    other.write_text("peft.r: {choice: [2, 8]}\n")
    refused = subprocess.run([TUNESMITH, "sweep", str(config), "--space", str(other), "--trials", "4", "-o", str(out)],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "holds a sweep with another space" in refused.stderr


def test_sweep_refuses_a_bad_space_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    from click.testing import CliRunner

    from tunesmith.cli import cli

    config, _, _ = _write_setup(tmp_path, tiny_model_dir)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training.learnig_rate: {loguniform: [1.0e-5, 1.0e-3]}\n")
    res = CliRunner().invoke(cli, ["sweep", str(config), "--space", str(bad), "--trials", "2", "-o", str(tmp_path / "o")])
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "training.learnig_rate = 1e-05 makes the config invalid" in msg and "did you mean 'learning_rate'" in msg
    noeval = tmp_path / "noeval.yaml"
    noeval.write_text(config.read_text().replace("eval_steps: 1", "eval_steps: 0"))
    good = tmp_path / "good.yaml"
    good.write_text("peft.r: {choice: [2, 4]}\n")
    res = CliRunner().invoke(cli, ["sweep", str(noeval), "--space", str(good), "--trials", "2", "-o", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "training.eval_steps is 0" in str(res.exception)
    assert not (tmp_path / "o2" / "trials").exists()


@pytest.mark.slow
def test_parallel_workers_share_one_study(tmp_path: Path, tiny_model_dir: Path) -> None:
    config, space, _ = _write_setup(tmp_path, tiny_model_dir)
    out = tmp_path / "par"
    res = subprocess.run([TUNESMITH, "sweep", str(config), "--space", str(space), "--trials", "3", "--parallel", "2",
                          "-o", str(out), "--pruner", "none", "--set", "training.max_steps=2", "--json"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["counts"]["complete"] == 3 and len(report["trials"]) == 3  # exactly --trials, none extra
    study = optuna.load_study(study_name="tiny-sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert "[worker 0]" in res.stderr + res.stdout and "[worker 1]" in res.stderr + res.stdout
