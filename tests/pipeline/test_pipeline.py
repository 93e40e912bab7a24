"""``tunesmith run``: stages, state, --from, the summary, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunesmith.core.errors import TunesmithError
from tunesmith.core.pipeline import STAGES, plan_stages, stage_name

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def tiny(model_dir: Path) -> list[str]:
    return ["--set", "model.source=hf", "--set", f"model.path={model_dir}"]


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    from tunesmith.cli import cli

    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.exception


def test_stage_names_and_plans() -> None:
    assert stage_name("clean") == "data" and stage_name("eval") == "evaluate"
    with pytest.raises(TunesmithError, match="unknown stage"):
        stage_name("deploy")
    assert plan_stages({"stages": {}}, from_stage=None, resume=False) == list(STAGES)
    done = {"stages": {"data": {"status": "done"}, "train": {"status": "failed"}}}
    assert plan_stages(done, from_stage="train", resume=False) == ["train", "evaluate", "export", "register"]
    assert plan_stages(done, from_stage=None, resume=True)[0] == "train"
    assert plan_stages(done, from_stage="split", resume=False, until="train") == ["data", "train"]
    with pytest.raises(TunesmithError, match="'train' has not completed"):
        plan_stages(done, from_stage="export", resume=False)


def test_quickstart_runs_fails_and_restarts_from_a_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    bad_registry = tmp_path / "not-a-dir"
    bad_registry.write_text("a file where the registry folder should be")
    common = [
        str(EXAMPLES / "quickstart.yaml"), *tiny(tiny_model_dir), "-o", str(run),
        "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
        "--set", "evaluation.0.limit=4", "--set", "evaluation.1.limit=2", "--set", "evaluation.1.max_new_tokens=4",
    ]
    # 1. the register stage fails: the error names the stage and the --from that restarts it
    code, out, exc = invoke("run", *common, "--set", f"registry.path={bad_registry}", "--json")
    assert code != 0
    assert isinstance(exc, TunesmithError) and "stage 'register' failed" in str(exc) and "--from register" in str(exc)
    state = json.loads((run / "pipeline.json").read_text())
    assert [state["stages"][s]["status"] for s in STAGES] == ["done", "done", "done", "done", "failed"]
    trained_at = (run / "final" / "tunesmith.json").stat().st_mtime_ns
    data_finished = state["stages"]["data"]["finished"]

    # 2. --from register reuses everything before it
    code, out, exc = invoke("run", *common, "--set", f"registry.path={tmp_path / 'registry'}", "--from", "register", "--json")
    assert code == 0, (out, exc)
    summary = json.loads(out)
    state = json.loads((run / "pipeline.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in STAGES)
    assert state["stages"]["data"]["finished"] == data_finished
    assert (run / "final" / "tunesmith.json").stat().st_mtime_ns == trained_at
    assert json.loads((run / "summary.json").read_text()) == summary

    # the summary: data, training, base vs tuned, artefacts, registry
    d = summary["data"]
    # five planted duplicates; near-duplicate detection may take a templated row or two
    assert d["rows_in"] == 325 and d["kept"] + d["rejected"] == 325 and 5 <= d["rejected"] <= 8
    assert d["rejected_by"]["exact_dedupe"] == 5 and sum(d["rejected_by"].values()) == d["rejected"]
    assert sum(d["splits"].values()) == d["kept"]
    assert summary["train"]["steps"] == 2 and summary["train"]["loss"] > 0 and summary["train"]["last_loss"] > 0
    metrics = {(r["evaluator"], r["metric"]): r for r in summary["metrics"]}
    em = metrics[("generation", "exact_match")]
    assert em["base"] is not None and em["tuned"] is not None
    assert metrics[("perplexity", "perplexity")]["base"] > 1
    assert Path(summary["artefacts"]["exports"]["adapter"]).is_dir()
    assert Path(summary["artefacts"]["eval_report"]).exists()
    assert summary["registry"]["version"] == "v1" and summary["registry"]["name"] == "quickstart-router"
    versions = json.loads((tmp_path / "registry" / "quickstart-router" / "versions.json").read_text())
    assert versions["versions"][0]["metrics"]["generation.exact_match"] == em["tuned"]
    # the rejected rows are in the run directory, with file and line
    rejects = [json.loads(x) for x in (run / "data" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == d["rejected"] and all(r["line"] for r in rejects)

    # 3. the human summary
    code, out, exc = invoke("run", *common, "--set", f"registry.path={tmp_path / 'registry'}", "--from", "register")
    assert code == 0, (out, exc)
    assert f"325 rows in, {d['kept']} kept, {d['rejected']} rejected (exact_dedupe 5" in out
    assert "base vs tuned" in out and "exact_match" in out and "version v2" in out


def test_from_a_stage_needs_the_earlier_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, out, exc = invoke("run", str(EXAMPLES / "quickstart.yaml"), *tiny(tiny_model_dir), "-o", str(tmp_path / "r"),
                            "--from", "evaluate")
    assert code != 0 and "'data' has not completed" in str(exc)
    code, out, exc = invoke("run", str(EXAMPLES / "quickstart.yaml"), "--from", "deploy")
    assert code != 0 and "unknown stage" in str(exc)
