"""training.distributed in one process: validation, dispatch decisions, the launch check
of a single process, payloads (no process group, no Ray cluster)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.distributed.conftest import write_config


@pytest.fixture
def cfg_path(tmp_path: Path, tiny_model_dir: Path, chat_data: Path) -> Path:
    return write_config(tmp_path, "one", tiny_model_dir, chat_data)


def _clear_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TUNESMITH_LAUNCHED", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_FSDP",
              "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(k, raising=False)


def test_unknown_backend_is_a_config_error(cfg_path: Path) -> None:
    import tunesmith
    from tunesmith.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        tunesmith.load_config(cfg_path, ["training.distributed.backend=spark"])
    assert "training.distributed.backend" in str(e.value) and "'ray'" in str(e.value)
    with pytest.raises(ConfigError, match="num_workers"):
        tunesmith.load_config(cfg_path, ["training.distributed.num_workers=0"])


def test_dispatch_runs_here_unless_asked(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith
    from tunesmith.core.launch import ENV_LAUNCHED
    from tunesmith.distributed import dispatch

    _clear_launch_env(monkeypatch)
    assert dispatch(tunesmith.load_config(cfg_path)) is None  # backend none: this process
    cfg = tunesmith.load_config(cfg_path, ["training.distributed.backend=torchrun"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of a launcher's processes: train as one of them
    assert dispatch(cfg) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(ENV_LAUNCHED, "torchrun")  # a worker tunesmith started: never dispatches again
    assert dispatch(tunesmith.load_config(cfg_path, ["training.distributed.backend=ray"])) is None


def test_ray_inside_torchrun_is_refused(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith
    from tunesmith.core.launch import LaunchError
    from tunesmith.distributed import dispatch

    _clear_launch_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(LaunchError, match="backend is ray, but torchrun already started 2 processes"):
        dispatch(tunesmith.load_config(cfg_path, ["training.distributed.backend=ray"]))


def test_ray_missing_says_how_to_install(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith
    from tunesmith.core.launch import LaunchError
    from tunesmith.distributed import dispatch

    _clear_launch_env(monkeypatch)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(LaunchError) as e:
        dispatch(tunesmith.load_config(cfg_path, ["training.distributed.backend=ray"]))
    assert "pip install 'tunesmith[ray]'" in str(e.value)


def test_single_process_fsdp_on_cpu_is_refused(cfg_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tunesmith
    from tunesmith.core.launch import LaunchError, check_launch

    _clear_launch_env(monkeypatch)
    cfg = tunesmith.load_config(cfg_path)
    assert check_launch(cfg, tmp_path / "run") == {"world_size": 1, "launcher": "none"}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    import torch

    if torch.cuda.is_available():
        pytest.skip("FSDP is possible with a GPU")
    with pytest.raises(LaunchError, match=r"accelerate launch asked for FSDP \(distributed_type: FSDP\).*CPU"):
        check_launch(cfg, tmp_path / "run")


def test_payload_rebuilds_the_same_config(cfg_path: Path, tmp_path: Path) -> None:
    import tunesmith
    from tunesmith.core.launch import config_from_payload, config_payload

    cfg = tunesmith.load_config(cfg_path, ["training.distributed.backend=ray", "peft.r=2"])
    payload = config_payload(cfg, tunesmith.registry(), resume=True, run_dir=None)
    import json

    again = config_from_payload(json.loads(json.dumps(payload)))
    assert again.hash() == cfg.hash() and again.base_dir == cfg.base_dir.resolve()
    assert payload["resume"] is True and Path(payload["run_dir"]).is_absolute()
