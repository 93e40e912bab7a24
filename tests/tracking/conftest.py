"""Shared pieces of the tracking tests: one migrated MLflow store per session (creating
the schema takes seconds; each test copies it), configs on the tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlflow")
    from tunesmith.model_registry.mlflow_store import make_client

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    make_client(f"sqlite:///{db}")
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template_db: Path) -> str:
    """A fresh sqlite MLflow store for one test."""
    db = tmp_path / "mlstore" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    return f"sqlite:///{db}"


@pytest.fixture
def tiny_cfg(tmp_path: Path, tiny_model_dir: Path, tiny_chat_file: Path) -> Any:
    """tiny_cfg(training={...}, **top) -> a validated config on the tiny model (file in tmp_path)."""
    import tunesmith

    def _make(*, name: str = "tiny", training: dict | None = None, **top: Any) -> Any:
        t = {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
             "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
             "gradient_checkpointing": False, "early_stopping": None, "lr_scheduler": "constant", "precision": "fp32"}
        t.update(training or {})
        cfg = {
            "name": name,
            "model": {"source": "hf", "path": str(tiny_model_dir)},
            "data": {"path": str(tiny_chat_file), "split": {"train": 0.8, "validation": 0.2, "test": 0.0}},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
            "training": t,
            "output_dir": str(tmp_path / f"run-{name}"),
        }
        cfg.update(top)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        tunesmith.reset_plugins()
        return tunesmith.load_config(path)

    return _make
