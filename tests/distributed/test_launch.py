"""Launches that cannot go silently wrong, and the pair objectives under torchrun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.distributed.conftest import (
    BIN, assert_one_checkpoint_set, cli, free_port, losses, max_diff, output, rank_reports, run_dir, torchrun, write_config,
)

pytestmark = pytest.mark.distributed


def error_lines(proc) -> list[str]:
    return [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("error:")]


def assert_nothing_trained(run: Path) -> None:
    assert not (run / "final").exists()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists() or not losses(run)


def test_accelerate_fsdp_on_cpu_fails_fast(tmp_path: Path, tiny_model_dir: Path, chat_data: Path) -> None:
    """`accelerate launch --config_file fsdp.yaml` with use_cpu: true starts two processes
    that accelerate does not shard (it falls back to plain DDP, or reports
    DistributedType.NO): refused before anything loads, one line on the terminal."""
    acc = tmp_path / "accelerate-fsdp.yaml"
    acc.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_processes": 2, "num_machines": 1,
        "machine_rank": 0, "use_cpu": True, "mixed_precision": "no",
        "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                        "fsdp_state_dict_type": "SHARDED_STATE_DICT"},
    }))
    cfg = write_config(tmp_path, "fsdp", tiny_model_dir, chat_data)
    p = cli(["train", str(cfg)], launcher=[str(BIN / "accelerate"), "launch", "--config_file", str(acc),
                                            "--main_process_port", str(free_port())])
    assert p.returncode != 0
    errors = error_lines(p)
    assert len(errors) == 1, output(p)  # rank 0 says it; rank 1's output is in its log
    assert "distributed_type: FSDP" in errors[0] and "CPU" in errors[0] and "torchrun" in errors[0], errors[0]
    run = run_dir(cfg)
    assert "distributed_type: FSDP" in (run / "logs" / "rank-1.out").read_text()
    assert_nothing_trained(run)
    assert not (run / "ranks" / "rank-0.json").exists()


def test_world_size_without_a_process_group_fails_fast(tmp_path: Path, tiny_model_dir: Path, chat_data: Path) -> None:
    cfg = write_config(tmp_path, "ws", tiny_model_dir, chat_data)
    p = cli(["train", str(cfg)], WORLD_SIZE="2", RANK="0")
    assert p.returncode == 5, output(p)
    (err,) = error_lines(p)
    assert "WORLD_SIZE=2" in err and "process group" in err and "torchrun" in err, err
    assert_nothing_trained(run_dir(cfg))


def test_gradual_unfreezing_is_refused_under_ddp(tmp_path: Path, tiny_model_dir: Path, chat_data: Path) -> None:
    cfg = write_config(tmp_path, "unfreeze", tiny_model_dir, chat_data,
                       peft={"method": "freeze", "top_n": 1, "unfreeze_every": 2})
    p = cli(["train", str(cfg)], launcher=torchrun(2))
    assert p.returncode != 0
    errors = error_lines(p)
    assert len(errors) == 1, output(p)
    assert "'freeze' changes which parameters train" in errors[0] and "step 0" in errors[0], errors[0]
    assert "one process" in errors[0]
    assert_nothing_trained(run_dir(cfg))


def test_ppo_own_loop_is_refused_under_ddp(tmp_path: Path, tiny_model_dir: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {i}."}) + "\n" for i in range(8)))
    cfg = write_config(tmp_path, "ppo", tiny_model_dir, prompts, training={"save_steps": 0},
                       objective={"name": "ppo", "rewards": [{"name": "regex", "pattern": "x", "mode": "match"}],
                                  "max_new_tokens": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1})
    p = cli(["train", str(cfg), "--set", "training.distributed.backend=torchrun"])  # tunesmith starts torchrun
    assert p.returncode != 0
    errors = error_lines(p)
    assert errors and "objective 'ppo' trains in its own loop" in errors[0] and "2 processes" in errors[0], output(p)
    assert_nothing_trained(run_dir(cfg))


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_pair_objectives_under_torchrun_one_checkpoint_set_and_resume(
    objective: str, tmp_path: Path, tiny_model_dir: Path, pairs_data: Path
) -> None:
    """Two processes: both train their shards, rank 0 writes one set of complete
    checkpoints and one final artefact; losing the last checkpoint and the final,
    --resume from checkpoint-2 ends with the same weights."""
    cfg = write_config(tmp_path, objective, tiny_model_dir, pairs_data, objective=objective,
                       training={"learning_rate": 5e-3})
    run = run_dir(cfg)
    # dpo: tunesmith starts torchrun itself; reward: the user's torchrun
    how = {"launcher": torchrun(2)} if objective == "reward" else {}
    extra = [] if objective == "reward" else ["--set", "training.distributed.backend=torchrun"]
    p = cli(["train", str(cfg), *extra], **how)
    assert p.returncode == 0, output(p)
    reports = rank_reports(run)
    assert [(r["rank"], r["world_size"], r["steps"]) for r in reports] == [(0, 2, 4), (1, 2, 4)], reports
    assert_one_checkpoint_set(run, [2, 4])
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] == objective and info["steps"] == 4
    first = tmp_path / "first-final"
    shutil.copytree(run / "final", first)
    for gone in (run / "final", run / "checkpoints" / "checkpoint-4", run / "train_result.json"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    p = cli(["train", str(cfg), "--resume", "--json", *extra], **how)
    assert p.returncode == 0, output(p)
    result = json.loads(p.stdout[p.stdout.index("{\n"):])
    assert result["resumed_from"].endswith("checkpoint-2") and result["steps"] == 4, result
    assert_one_checkpoint_set(run, [2, 4])
    diff = max_diff(first, run / "final")
    assert diff < 1e-6, diff
    assert sorted({s for s, _ in losses(run)}) == [1, 2, 3, 4]
