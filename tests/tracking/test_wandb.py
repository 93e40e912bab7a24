"""The wandb logger offline (no account, no network): the run's files are what W&B's
own tools accept (``wandb sync --dry-run``), and the records in the ``.wandb`` file,
decoded with W&B's own protobuf schema, hold the config, every step and the summary."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tunesmith
from tunesmith.core.context import RunContext
from tunesmith.core.tracking import open_loggers, read_state

pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file (W&B's LevelDB-log framing:
    ``:W&B`` header, 32 KiB blocks, 7-byte record headers) as protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B data file"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:
            break
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def test_offline_run_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run dir wins: files stay with the run
    cfg = tunesmith.validate_config({"name": "wb-run", "output_dir": str(tmp_path / "run"), "training": {
        "learning_rate": 3e-4, "report_to": [{"name": "wandb", "tags": ["tiny"], "group": "sweep-1"}]}})
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: wb-run\n")
    (run_dir / "final").mkdir()
    (run_dir / "final" / "adapter_config.json").write_text("{}")
    ctx = RunContext(config=cfg, run_dir=run_dir, registries=tunesmith.registry())
    with open_loggers(cfg, ctx.registries, ctx) as loggers:
        assert loggers.names == ["wandb", "jsonl"]
        for step in (1, 2, 3):
            loggers.log_metrics({"loss": 3.0 / step, "learning_rate": 3e-4, "epoch": step / 3}, step)
        loggers.log_metrics({"eval_loss": 1.25}, 3)
        loggers.log_artifact(run_dir / "final", "adapter")
        loggers.close("finished", {"train_loss": 1.5, "steps": 3})
    state = read_state(run_dir, "wandb")
    assert state["mode"] == "offline" and state["project"] == "wb-run"
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(offline) == 1 and not (tmp_path / "elsewhere").exists()
    data_file = offline[0] / f"run-{state['id']}.wandb"

    # W&B's own CLI recognises it as an offline run ready to upload
    wandb_cli = Path(sys.executable).parent / "wandb"
    res = subprocess.run([str(wandb_cli), "sync", "--dry-run", str(offline[0])], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "Would sync 1 run" in res.stdout + res.stderr, res.stdout + res.stderr

    records = read_wandb_records(data_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == state["id"] and run.display_name == "wb-run" and list(run.tags) == ["tiny"]
    assert run.run_group == "sweep-1"
    config = {_key(i): i.value_json for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert config["training.learning_rate"] == "0.0003" and config["peft.method"] == '"lora"'
    steps = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {_key(i): i.value_json for i in r.history.item}
            steps[int(row["_step"])] = row
    assert sorted(steps) == [1, 2, 3]
    assert float(steps[1]["loss"]) == 3.0 and float(steps[3]["eval_loss"]) == 1.25
    summary = {_key(i): i.value_json for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert float(summary["train_loss"]) == 1.5
    art = next(r.artifact for r in records if r.WhichOneof("record_type") == "artifact")
    assert art.type == "model" and [c.path for c in art.manifest.contents] == ["adapter_config.json"]
    exit_rec = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_rec.exit_code == 0
    files = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "config.yaml" in files  # the run's config file is one of the run files

    # resume: the same W&B run id continues
    ctx2 = RunContext(config=cfg, run_dir=run_dir, registries=ctx.registries, state={"resume": True})
    with open_loggers(cfg, ctx2.registries, ctx2) as loggers:
        loggers.log_metrics({"loss": 0.5}, 4)
    assert read_state(run_dir, "wandb")["id"] == state["id"]
