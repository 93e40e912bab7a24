"""Serving engines as a plugin area: the vllm and llamacpp hand-offs (their adapter
checks, their commands, a launch with a stand-in executable) and a third-party engine."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.export.conftest import make_run
from tunesmith.serving.spec import ServeSpec

ROOT = Path(__file__).resolve().parents[2]


def _lora(**kw: Any) -> Any:
    from peft import LoraConfig

    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, "lora_dropout": 0.0}
    return LoraConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """Adapters vLLM cannot serve, each for one reason, and one it can."""
    from peft import IA3Config

    from tunesmith.testing import build_tiny_model

    root = tmp_path_factory.mktemp("odd-adapters")
    other_base = build_tiny_model(root / "other-base", hidden=32, tok_dir=tiny_tokenizer_dir)
    return {
        "ok": make_run(root / "ok", tiny_model_dir, _lora()),
        "r64": make_run(root / "r64", tiny_model_dir, _lora(r=64, lora_alpha=64)),
        "dora": make_run(root / "dora", tiny_model_dir, _lora(use_dora=True)),
        "mts": make_run(root / "mts", tiny_model_dir, _lora(modules_to_save=["lm_head"])),
        "emb": make_run(root / "emb", tiny_model_dir, _lora(target_modules=["embed_tokens", "q_proj"])),
        "pattern": make_run(root / "pattern", tiny_model_dir, _lora(rank_pattern={"v_proj": 16})),
        "other": make_run(root / "other", other_base, _lora()),
        "ia3": make_run(root / "ia3", tiny_model_dir, IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    }


def _vllm(spec: ServeSpec, **opts: Any) -> tuple[list[str], list[str]]:
    from tunesmith.plugins.serving.vllm import VllmEngine

    eng = VllmEngine()
    options = eng.Options(**opts)
    return eng.check(spec, options), eng.command(spec, options)


def test_vllm_checks_each_adapter(tiny_model_dir: Path, odd_adapters: dict[str, Path]) -> None:
    base = str(tiny_model_dir)
    problems, argv = _vllm(ServeSpec(base=base, adapters={"ok": str(odd_adapters["ok"])}))
    assert problems == []
    assert argv[:3] == ["vllm", "serve", str(tiny_model_dir.resolve())]
    i = argv.index("--lora-modules")
    assert argv[i + 1] == f"ok={(odd_adapters['ok'] / 'final').resolve()}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert argv[argv.index("--served-model-name") + 1] == "base"

    want = {
        "r64": "LoRA rank 64 is greater than --max-lora-rank 16",
        "dora": "DoRA",
        "mts": "modules_to_save (lm_head)",
        "emb": "LoRA on the embedding",
        "pattern": "rank_pattern",
        "other": "trained on another model",
        "ia3": "IA3 adapters are not supported by vLLM",
    }
    adapters = {n: str(odd_adapters[n]) for n in ["ok", *want]}
    problems, _ = _vllm(ServeSpec(base=base, adapters=adapters), max_lora_rank=16)
    for name, why in want.items():
        assert any(p.startswith(f"adapter '{name}': ") and why in p for p in problems), (name, problems)
    assert not any(p.startswith("adapter 'ok'") for p in problems)
    # without --max-lora-rank the smallest value that fits every adapter is chosen
    problems, argv = _vllm(ServeSpec(base=base, adapters={"ok": adapters["ok"], "r64": adapters["r64"]}))
    assert problems == [] and argv[argv.index("--max-lora-rank") + 1] == "64"
    assert argv[argv.index("--max-loras") + 1] == "2"
    with pytest.raises(ValueError, match="320"):
        _vllm(ServeSpec(base=base), max_lora_rank=24)


def test_vllm_cli_dry_run_and_refusal(tiny_model_dir: Path, odd_adapters: dict[str, Path]) -> None:
    from tunesmith.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--engine", "vllm", "--base", str(tiny_model_dir), "--adapter",
                            f"ok={odd_adapters['ok']}", "--port", "9001", "--opt", "max_model_len=256", "--dry-run",
                            "--api-key", "secret"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("vllm serve ") and "--lora-modules ok=" in r.stdout and "--port 9001" in r.stdout
    assert "--max-model-len 256" in r.stdout and "secret" not in r.stdout
    r = runner.invoke(cli, ["serve", "--engine", "vllm", "--base", str(tiny_model_dir), "--adapter",
                            f"big={odd_adapters['r64']}", "--max-lora-rank", "32", "--dry-run"])
    assert r.exit_code == 2
    assert "adapter 'big': LoRA rank 64 is greater than --max-lora-rank 32" in r.output
    r = runner.invoke(cli, ["serve", "--engine", "vllm", "--max-batch-size", "4", "--dry-run"])
    assert r.exit_code == 2 and "has no option 'max_batch_size'" in r.output


def _fake(bin_dir: Path, name: str, env_var: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_OUT"\necho "KEY=${env_var}" >> "$FAKE_OUT"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _launch(args: list[str], bin_dir: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_OUT": str(out),
           "TUNESMITH_API_KEY": "s3cret", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tunesmith", "serve", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_vllm_launch_hands_over_to_vllm(tmp_path: Path, tiny_model_dir: Path, odd_adapters: dict[str, Path]) -> None:
    _fake(tmp_path / "bin", "vllm", "VLLM_API_KEY")
    out = tmp_path / "argv.txt"
    p = _launch(["--engine", "vllm", "--base", str(tiny_model_dir), "--adapter", f"ok={odd_adapters['ok']}"],
                tmp_path / "bin", out)
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "serve" and "--enable-lora" in lines and f"ok={(odd_adapters['ok'] / 'final').resolve()}" in lines
    assert lines[-1] == "KEY=s3cret" and "s3cret" not in lines[:-1]  # the key travels in the environment


def _write_gguf(path: Path, kind: str, arch: str = "llama") -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(kind)
    if kind == "adapter":
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
    w.add_tensor("blk.0.attn_q.weight" + (".lora_a" if kind == "adapter" else ""), np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llamacpp_checks_and_command(tmp_path: Path, odd_adapters: dict[str, Path]) -> None:
    from tunesmith.plugins.serving.llamacpp import LlamaCppEngine

    base = _write_gguf(tmp_path / "base.gguf", "model")
    a = _write_gguf(tmp_path / "a.gguf", "adapter")
    run = tmp_path / "run-b" / "exports"
    run.mkdir(parents=True)
    b = _write_gguf(run / "b-lora.gguf", "adapter")
    qwen = _write_gguf(tmp_path / "q.gguf", "adapter", arch="qwen2")
    eng = LlamaCppEngine()
    opts = eng.Options()
    spec = ServeSpec(base=str(base), adapters={"a": str(a), "b": str(tmp_path / "run-b")}, port=9002)
    assert eng.check(spec, opts) == []
    argv = eng.command(spec, opts)
    assert argv[:3] == ["llama-server", "-m", str(base.resolve())]
    assert [argv[i + 1] for i, x in enumerate(argv) if x == "--lora"] == [str(a.resolve()), str(b.resolve())]
    assert "--lora-init-without-apply" in argv and argv[argv.index("--port") + 1] == "9002"
    assert eng.adapter_ids(spec) == {"a": 0, "b": 1}
    assert "--lora-init-without-apply" not in eng.command(spec, eng.Options(lora_mode="all"))

    bad = ServeSpec(base=str(a), adapters={"peft": str(odd_adapters["ok"]), "q": str(qwen), "m": str(base),
                                           "gone": str(tmp_path / "missing.gguf")})
    problems = eng.check(bad, opts)
    assert any(p.startswith("base: ") and "is a LoRA adapter GGUF, not a model" in p for p in problems)
    assert any(p.startswith("adapter 'peft': ") and "--format gguf-lora" in p for p in problems)
    assert any(p.startswith("adapter 'm': ") and "not a LoRA adapter GGUF" in p for p in problems)
    assert any(p.startswith("adapter 'gone': ") and "does not exist" in p for p in problems)
    problems = eng.check(ServeSpec(base=str(base), adapters={"q": str(qwen)}), opts)
    assert problems == ["adapter 'q': made for architecture 'qwen2', the base is 'llama'"]


def test_llamacpp_launch(tmp_path: Path) -> None:
    base = _write_gguf(tmp_path / "base.gguf", "model")
    a = _write_gguf(tmp_path / "a.gguf", "adapter")
    _fake(tmp_path / "bin", "llama-server", "LLAMA_API_KEY")
    out = tmp_path / "argv.txt"
    p = _launch(["--engine", "llamacpp", "--base", str(base), "--adapter", f"a={a}", "--opt", "parallel=4"],
                tmp_path / "bin", out)
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert lines[:2] == ["-m", str(base.resolve())] and "--lora" in lines and lines[lines.index("--parallel") + 1] == "4"
    assert lines[-1] == "KEY=s3cret"
    assert '"lora": [{"id": 0, "scale": 1.0}]' in p.stderr


def test_transformers_engine_check(tiny_model_dir: Path, odd_adapters: dict[str, Path]) -> None:
    from tunesmith.plugins.serving.transformers import TransformersEngine

    eng = TransformersEngine()
    spec = ServeSpec(base=str(tiny_model_dir), adapters={"ia3": str(odd_adapters["ia3"]), "ok": str(odd_adapters["ok"]),
                                                         "dora": str(odd_adapters["dora"])})
    problems = eng.check(spec, eng.Options())
    assert len(problems) == 1 and problems[0].startswith("adapter 'ia3': IA3") and "--mode serial" in problems[0]
    assert eng.check(spec, eng.Options(mode="serial")) == []


def test_a_plugin_engine_is_selected_by_name(tunesmith_plugin: Any, tiny_model_dir: Path) -> None:
    from pydantic import BaseModel, ConfigDict

    from tunesmith import hookimpl
    from tunesmith.cli import cli

    calls: list = []

    class EchoEngine:
        name = "echo"
        description = "test engine"

        class Options(BaseModel):
            model_config = ConfigDict(extra="forbid")
            greeting: str = "hi"

        def check(self, spec: Any, options: Any) -> list[str]:
            return [f"adapter '{n}': not welcome" for n in spec.adapters if n == "x"]

        def serve(self, spec: Any, options: Any) -> None:
            calls.append((spec.base, dict(spec.adapters), options.greeting, spec.port))

    class Plugin:
        @hookimpl
        def register_serving_engines(self, register: Any) -> None:
            register(EchoEngine())

    tunesmith_plugin(Plugin(), "echo-engine")
    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--engine", "echo", "--base", "b", "--adapter", "y=/p", "--port", "7",
                            "--opt", "greeting=hello"])
    assert r.exit_code == 0, r.output
    assert calls == [("b", {"y": "/p"}, "hello", 7)]
    r = runner.invoke(cli, ["serve", "--engine", "echo", "--adapter", "x=/p"])
    assert r.exit_code == 2 and "adapter 'x': not welcome" in r.output and len(calls) == 1
    r = runner.invoke(cli, ["serve", "--engine", "ech"])
    assert r.exit_code != 0 and "did you mean 'echo'" in str(r.exception)
