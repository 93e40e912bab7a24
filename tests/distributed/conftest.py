"""Helpers for the multi-process tests: configs on the tiny model, CLI runs under
torchrun / accelerate / Ray, one Ray head node shared by the module's Ray tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TUNESMITH = str(BIN / "tunesmith")

#: LoRA with dropout (so every rank's RNG state must resume too), checkpoints every 2 steps
TRAINING = {
    "max_steps": 4, "learning_rate": 1e-2, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
    "logging_steps": 1, "save_steps": 2, "save_total_limit": 3, "eval_steps": 0, "warmup_ratio": 0.0,
    "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant",
    "precision": "fp32",
}
LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.1}


def env(**extra: str) -> dict[str, str]:
    # RAY_AUTH_MODE: the test's own head node on 127.0.0.1, joined without Ray's token (kept in ~/.ray)
    out = dict(os.environ, TUNESMITH_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", RAY_AUTH_MODE="disabled")
    for k in [k for k in out if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TUNESMITH_LAUNCHED"))]:
        out.pop(k)
    out.update(extra)
    return out


def write_config(folder: Path, name: str, model_dir: Path, data: Path, *, training: dict | None = None,
                 peft: dict | None = None, **top: Any) -> Path:
    cfg = {
        "model": {"source": "hf", "path": str(model_dir)},
        "data": {"path": str(data)},
        "peft": peft or LORA,
        "training": {**TRAINING, **(training or {})},
        "output_dir": str(folder / f"run-{name}"),
        **top,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_dir(cfg_path: Path) -> Path:
    return Path(yaml.safe_load(cfg_path.read_text())["output_dir"])


def cli(args: list[str], *, timeout: int = 400, launcher: list[str] | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    cmd = (launcher or []) + [TUNESMITH, *args]
    return subprocess.run(cmd, env=env(**env_extra), cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def output(proc: Any) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys(), (sorted(wa)[:3], sorted(wb)[:3])
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "train_loss" not in r]


def rank_reports(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def assert_one_checkpoint_set(run: Path, steps: list[int], world: int = 2) -> None:
    """Rank 0 wrote one set of complete checkpoints (each rank's RNG state in it), no
    staging leftovers, and one final artefact."""
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"checkpoint-{s}" for s in steps], names
    for s in steps:
        files = {p.name for p in (folder / f"checkpoint-{s}").iterdir()}
        assert "COMPLETE" in files and "trainer_state.json" in files, files
        rng = sorted(n for n in files if n.startswith("rng_state") and n.endswith(".safetensors"))
        assert len(rng) == world, files
    finals = [p for p in run.rglob("tunesmith.json") if p.parent.name == "final"]
    assert finals == [run / "final" / "tunesmith.json"], finals


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunesmith.testing import TINY_CHAT

    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pairs_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = []
    for a in range(1, 9):
        for b in range(1, 3):
            rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                         "chosen": [{"role": "assistant", "content": f"{a + b}."}],
                         "rejected": [{"role": "assistant", "content": f"{a * b + 7}, I think."}]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """One Ray head node for the module (``ray start --head --block``, ended by its own
    process group); the tests join it through ``training.distributed.address``."""
    pytest.importorskip("ray.train", reason="Ray Train tests need the ray extra (pip install 'tunesmith[ray]')")
    temp = tempfile.mkdtemp(prefix="ts-ray-", dir="/tmp")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    lines: list[str] = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "Ray runtime started" in line or "--block" in line and "started" in line.lower():
            break
    if proc.poll() is not None:
        pytest.fail("ray start --head failed:\n" + "".join(lines))
    try:
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=8)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # what is left of this head node (its process group): nothing of it is needed any more
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)
