"""Ray Train on two CPU workers: the same training as torchrun, and a worker killed
mid-run recovers by itself to the same adapter."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
import pytest

from tests.distributed.conftest import (
    ROOT, TUNESMITH, assert_one_checkpoint_set, cli, env, losses, max_diff, output, rank_reports, run_dir, torchrun,
    write_config,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, chat_data: Path, ray_head: str) -> dict:
    """The same 4-step LoRA run under ``torchrun --nproc_per_node=2`` and on 2 Ray workers."""
    folder = tmp_path_factory.mktemp("ray-ref")
    ddp = write_config(folder, "torchrun", tiny_model_dir, chat_data)
    ray = write_config(folder, "ray", tiny_model_dir, chat_data)
    p1 = cli(["train", str(ddp)], launcher=torchrun(2))
    assert p1.returncode == 0, output(p1)
    p2 = cli(["train", str(ray), "--ray", "--num-workers", "2", "--set", f"training.distributed.address={ray_head}",
              "--json"])
    assert p2.returncode == 0, output(p2)
    return {"torchrun": run_dir(ddp), "ray": run_dir(ray), "ray_config": ray, "ray_out": p2.stdout + p2.stderr,
            "ray_result": json.loads(p2.stdout[p2.stdout.index("{\n"):])}


def test_ray_two_workers_train_like_torchrun(reference: dict) -> None:
    ray_run, ddp_run = reference["ray"], reference["torchrun"]
    result = reference["ray_result"]
    assert result["steps"] == 4 and result["launch"]["backend"] == "ray" and result["launch"]["attempts"] == 1
    # both workers trained, each its own shard of every batch
    reports = rank_reports(ray_run)
    assert [(r["rank"], r["world_size"], r["steps"]) for r in reports] == [(0, 2, 4), (1, 2, 4)], reports
    assert all(r["tokens"] > 0 for r in reports)
    assert [(r["rank"], r["steps"], r["tokens"]) for r in reports] == \
        [(r["rank"], r["steps"], r["tokens"]) for r in rank_reports(ddp_run)]
    launch = [json.loads((ray_run / "ranks" / f"launch-{i}.json").read_text()) for i in (0, 1)]
    assert {(x["launcher"], x["process_group"], x["trainer_distributed_type"], x["trainer_processes"]) for x in launch} \
        == {("Ray Train", "gloo", "MULTI_CPU", 2)}, launch
    assert launch[0]["pid"] != launch[1]["pid"]
    # rank 0 wrote one set of checkpoints and one adapter
    assert_one_checkpoint_set(ray_run, [2, 4])
    assert (ray_run / "final" / "adapter_model.safetensors").exists()
    # the same numbers as torchrun: data sharded alike, token-weighted loss over both workers
    (ray_steps, ray_losses), (ddp_steps, ddp_losses) = zip(*losses(ray_run)), zip(*losses(ddp_run))
    assert ray_steps == ddp_steps == (1, 2, 3, 4)
    assert list(ray_losses) == pytest.approx(list(ddp_losses), abs=1e-6)
    diff = max_diff(ray_run / "final", ddp_run / "final")
    assert diff < 1e-6, diff
    # the terminal shows rank 0 only; rank 1's output is in its log
    out = reference["ray_out"]
    assert out.count("trained 4 steps (sft)") == 1, out[-3000:]
    assert (ray_run / "logs" / "rank-1.out").exists()


def test_ray_worker_sigkill_recovers_to_the_same_adapter(reference: dict, ray_head: str) -> None:
    cfg = reference["ray_config"].with_name("ray-kill.yaml")
    text = reference["ray_config"].read_text().replace("run-ray\n", "run-ray-kill\n")
    cfg.write_text(text)
    run = run_dir(cfg)
    assert run.name == "run-ray-kill"
    proc = subprocess.Popen(
        [TUNESMITH, "train", str(cfg), "--ray", "--num-workers", "2", "--set",
         f"training.distributed.address={ray_head}", "--json"],
        env=env(), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    victim = None
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before a worker could be killed:\n" + proc.stdout.read()[-4000:])
        done = run / "checkpoints" / "checkpoint-2" / "COMPLETE"
        info = run / "ranks" / "launch-1.json"
        if done.exists() and info.exists():
            victim = json.loads(info.read_text())["pid"]
            break
        time.sleep(0.05)
    assert victim, "no checkpoint-2 within 300 s"
    import os

    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    result = json.loads(out[out.index("{\n"):])
    assert result["launch"]["attempts"] == 2, result["launch"]  # Ray restarted the group once, by itself
    assert "ray: attempt 2 (Ray restarted the workers after a failure); resuming" in out, out[-3000:]
    assert result["steps"] == 4 and result["resumed_from"], result
    after = json.loads((run / "ranks" / "launch-1.json").read_text())
    assert after["pid"] != victim
    assert_one_checkpoint_set(run, [2, 4])
    steps = sorted({s for s, _ in losses(run)})
    assert steps == [1, 2, 3, 4], steps
    diff = max_diff(run / "final", reference["ray"] / "final")
    assert diff < 1e-6, diff


def test_ray_user_error_is_one_line_not_a_retry_loop(ray_head: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A deterministic error in the workers (data that is not chat) is tunesmith's own
    one-line error; the restarted group stops at once instead of reloading max_failures times."""
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    path = write_config(tmp_path, "bad", tiny_model_dir, bad)
    p = cli(["train", str(path), "--ray", "--num-workers", "1", "--set", f"training.distributed.address={ray_head}",
             "--set", "training.distributed.max_failures=5"])
    assert p.returncode == 3, output(p)  # DataError's exit code, from the worker
    err = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "needs chat or text records" in err[0] and "on Ray" in err[0], output(p)
    assert not (run_dir(path) / "final").exists()
    # the first group fails; the group Ray starts again stops at once (no further restarts up to max_failures=5)
    launch = json.loads((run_dir(path) / "launch.json").read_text())
    assert launch["attempts"] == 2 and "needs chat or text records" in launch["error"]["message"], launch
