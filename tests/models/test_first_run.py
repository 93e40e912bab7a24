"""First-run rough edges: a missing data file is reported before any model loads
(train, run, eval), and library noise stays out of the terminal (the run's log
keeps it; --verbose shows it)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    import transformers

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("tunesmith.core.models.load_from_dir", refuse)


def _config(tmp_path: Path, **top) -> Path:
    cfg = {"model": {"source": "default"}, "data": {"path": "data/missing.jsonl"}, "output_dir": str(tmp_path / "run"),
           "evaluation": [{"name": "perplexity", "path": "data/also-missing.jsonl"}]}
    cfg.update(top)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _fails(main, args, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "run", "eval"])
def test_missing_data_is_reported_before_any_model_loads(command, tmp_path, capsys, no_model_load):
    from tunesmith.cli import main

    cfg = _config(tmp_path)
    err = _fails(main, [command, str(cfg)], capsys)  # no_model_load: loading a model would fail the test
    line = err.strip().splitlines()[0]
    if command == "eval":
        assert "evaluation.0.path: the perplexity evaluator's file not found" in line and "also-missing.jsonl" in line
    else:
        assert line.startswith(f"error: {cfg}:") and "data.path: data file not found:" in line
        assert line.split(":")[2].isdigit()  # the config line
        assert str(tmp_path / "data" / "missing.jsonl") in line


def test_empty_data_folder_missing_model_and_bad_template_are_reported(tmp_path, capsys, no_model_load):
    from tunesmith.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty").mkdir()
    cfg = _config(tmp_path, data={"path": "data/empty"}, model={"source": "hf", "path": "models/nowhere"},
                  chat_template="chatmll")
    err = _fails(main, ["train", str(cfg)], capsys)
    assert "data.path: data file is an empty folder" in err
    assert "model.path: model not found" in err or "model folder not found" in err
    assert "chat_template: unknown chat template 'chatmll'" in err and "did you mean 'chatml'" in err


NOISE = """
import logging, sys, warnings
from tunesmith.cli import attach_run_log, quiet_libraries
quiet_libraries(verbose="-v" in sys.argv)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning)
logging.getLogger("tunesmith.test").warning("a tunesmith warning is shown")
log = attach_run_log(sys.argv[1])
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.trainer").warning("a later transformers warning")
print(log)
"""


def test_library_noise_goes_to_the_run_log_not_the_terminal(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NOISE, str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "gemm_4bit_forward" not in err and "deprecated" not in err and "later transformers" not in err, err
    assert "a tunesmith warning is shown" in err
    text = Path(proc.stdout.strip()).read_text(encoding="utf-8")
    for needle in ("gemm_4bit_forward", "gradient_checkpointing", "a tunesmith warning", "a later transformers warning"):
        assert needle in text
    loud = subprocess.run([sys.executable, "-c", NOISE, str(tmp_path / "run2"), "-v"], capture_output=True, text=True,
                          timeout=120)
    assert "gemm_4bit_forward" in loud.stderr and "later transformers" in loud.stderr


def test_other_ranks_stay_quiet(monkeypatch, capsys):
    from tunesmith.cli import quiet_libraries

    quiet_libraries(verbose=False)
    monkeypatch.setenv("RANK", "1")
    logging.getLogger("tunesmith.test").warning("rank 1 says this")
    assert "rank 1 says this" not in capsys.readouterr().err


def test_help_does_not_import_the_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from tunesmith.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out
