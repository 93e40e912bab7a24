"""training.precision (hardware detection, bf16 storage) and training.compile (decision, compiled blocks)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import losses_of

AMX = dict(device="cpu", name="CPU", native_bf16=True, bf16_unit="AMX")


def _hw(**kw: Any) -> Any:
    from tunesmith.core.precision import Hardware

    return Hardware(**kw)


def _weights(final: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(final.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------- detection
def test_cpu_flags_name_the_bf16_unit() -> None:
    from tunesmith.core.precision import cpu_bf16_unit, cpuinfo_flags

    text = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n\nprocessor : 1\n"
    flags = cpuinfo_flags(text)
    assert {"avx512_bf16", "amx_bf16"} <= flags
    assert cpu_bf16_unit(flags) == "AMX"
    assert cpu_bf16_unit({"avx512f", "avx512_bf16"}) == "AVX-512 BF16"
    assert cpu_bf16_unit({"avx2", "fma"}) is None
    assert cpuinfo_flags("no flags here") == set()


def test_this_machine_is_detected_consistently() -> None:
    import torch

    from tunesmith.core.precision import cpuinfo_flags, detect_hardware

    hw = detect_hardware()
    if not torch.cuda.is_available():
        assert hw.device == "cpu"
        flags = cpuinfo_flags()
        if flags:  # /proc/cpuinfo readable: torch's probe and the flags agree on bf16 support
            assert hw.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)


# --------------------------------------------------------------------------- the decision
def test_auto_chooses_bf16_only_where_it_is_native_and_pays() -> None:
    from tunesmith.core.errors import ConfigError
    from tunesmith.core.precision import MIN_CPU_BF16_HIDDEN, choose_precision

    amx = _hw(**AMX)
    big = choose_precision("auto", hardware=amx, hidden_size=576)
    assert big.compute == "bf16" and big.store_base_bf16 and big.trainer_flags() == {"bf16": True, "fp16": False, "use_cpu": True}
    assert "AMX" in big.line() and "frozen base stored in bf16" in big.line()
    assert choose_precision("auto", hardware=amx, hidden_size=MIN_CPU_BF16_HIDDEN - 1).compute == "fp32"
    assert choose_precision("auto", hardware=amx, hidden_size=576, full_model=True).compute == "fp32"
    assert choose_precision("auto", hardware=amx, hidden_size=576, quantized=True).compute == "fp32"
    plain = _hw(device="cpu", name="CPU", native_bf16=False)
    assert choose_precision("auto", hardware=plain, hidden_size=4096).compute == "fp32"
    ampere = _hw(device="cuda", name="A100", native_bf16=True, bf16_unit="sm_80", capability=(8, 0))
    turing = _hw(device="cuda", name="T4", native_bf16=False, capability=(7, 5))
    assert choose_precision("auto", hardware=ampere).compute == "bf16"
    assert choose_precision("auto", hardware=turing).compute == "fp16"
    # explicit choices are kept; full fine-tuning in bf16 keeps fp32 weights (autocast only)
    assert choose_precision("fp32", hardware=amx).compute == "fp32"
    full = choose_precision("bf16", hardware=plain, full_model=True)
    assert full.compute == "bf16" and not full.store_base_bf16 and "emulated" in full.line()
    with pytest.raises(ConfigError):
        choose_precision("fp16", hardware=amx)


def test_compile_auto_only_when_the_run_amortises_it() -> None:
    from tunesmith.core.compile import decide_compile

    quick = decide_compile("auto", steps=80, tokens_per_step=360, device="cpu", n_params=135_000_000)
    assert not quick.compile and "assumed" in quick.reason
    long = decide_compile("auto", steps=3000, tokens_per_step=360, device="cpu", n_params=135_000_000)
    assert long.compile
    # measured on this machine: a warm cache compiles in 5 s and saves 1 ms a token
    rec = {"compile_s": 5.0, "eager_s_per_token": 0.003, "compiled_s_per_token": 0.002}
    assert decide_compile("auto", steps=80, tokens_per_step=360, device="cpu", n_params=1, record=rec).compile
    slower = dict(rec, compiled_s_per_token=0.004)
    assert not decide_compile("auto", steps=10**6, tokens_per_step=360, device="cpu", n_params=1, record=slower).compile
    # an eager step measured 200x slower than the estimate (a busy machine), compile never measured:
    # compiling is assumed 200x slower too, so the quickstart still does not compile, a long run does
    busy = {"eager_s_per_token": 200 * 4.0 * 135_000_000 / 2.0e11}
    assert not decide_compile("auto", steps=80, tokens_per_step=360, device="cpu", n_params=135_000_000,
                              record=busy).compile
    assert decide_compile("auto", steps=30_000, tokens_per_step=360, device="cpu", n_params=135_000_000,
                          record=busy).compile
    assert decide_compile("on", steps=1, tokens_per_step=1, device="cpu", n_params=1).compile
    assert not decide_compile("off", steps=10**9, tokens_per_step=1e6, device="cpu", n_params=1).compile


def test_compile_records_keep_the_fastest_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesmith.core import compile as tcompile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tcompile.write_record("sig", eager_s_per_token=0.004)
    tcompile.write_record("sig", eager_s_per_token=0.6)  # measured while the machine was busy
    tcompile.write_record("sig", compiled_s_per_token=0.003, compile_s=90.0)
    tcompile.write_record("sig", compile_s=40.0)
    assert tcompile.read_records()["sig"] == {"eager_s_per_token": 0.004, "compiled_s_per_token": 0.003, "compile_s": 40.0}


def test_compile_switch_reads_yaml_booleans(make_cfg: Any) -> None:
    assert make_cfg(name="on", training={"compile": True}).training.compile == "on"
    assert make_cfg(name="off", training={"compile": False}).training.compile == "off"
    assert make_cfg(name="auto").training.compile == "auto"


# --------------------------------------------------------------------------- training
def test_tiny_model_auto_stays_fp32(make_cfg: Any, capsys: Any) -> None:
    """The tiny test model (hidden 64) trains in exact fp32 under auto, on any CPU."""
    import tunesmith
    from tunesmith.core.session import TrainingSession

    cfg = make_cfg(name="auto")
    s = TrainingSession(cfg, tunesmith.registry())
    s.start()
    model, _ = s.prepare_model()
    import torch

    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "precision auto: fp32" in capsys.readouterr().out


def test_bf16_stores_the_frozen_base_in_bf16_and_trains_fp32(make_cfg: Any, monkeypatch: Any) -> None:
    import torch

    import tunesmith
    from tunesmith.core import precision
    from tunesmith.core.session import TrainingSession, train

    # auto on a machine with AMX, for a model this small when the threshold allows it
    monkeypatch.setattr(precision, "detect_hardware", lambda: _hw(**AMX))
    monkeypatch.setattr(precision, "MIN_CPU_BF16_HIDDEN", 32)
    cfg = make_cfg(name="bf16", training={"max_steps": 6})
    s = TrainingSession(cfg, tunesmith.registry())
    s.start()
    model, _ = s.prepare_model()
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    args = s.training_arguments(has_eval=False, learning_rate=1e-2)
    assert args.bf16 and args.use_cpu

    bf = train(cfg, tunesmith.registry())
    ref = train(make_cfg(name="fp32", training={"max_steps": 6, "precision": "fp32"}), tunesmith.registry())
    lb, lf = losses_of(Path(bf["run_dir"])), losses_of(Path(ref["run_dir"]))
    assert lb[0] == pytest.approx(lf[0], rel=0.02)  # the same model, bf16 vs fp32 forward
    assert lb == pytest.approx(lf, rel=0.01)  # every step tracks the fp32 run
    assert lb[-1] < lb[0]  # and it learns
    w = _weights(Path(bf["run_dir"]) / "final")
    assert w and {t.dtype for t in w.values()} == {torch.float32}  # the adapter is saved in fp32
    info = json.loads((Path(bf["run_dir"]) / "final" / "tunesmith.json").read_text())
    assert info["dtype"] == "bfloat16"  # evaluation loads the base as it was trained


@pytest.mark.slow  # the cold inductor compile takes one to two minutes on a 2-core CPU
def test_compiled_blocks_train_like_eager(make_cfg: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """compile: on compiles the decoder layers once (dynamic lengths: no recompile per
    batch), trains to the eager losses and records the measured costs."""
    import torch

    import tunesmith
    from tunesmith.core import compile as tcompile
    from tunesmith.core.session import train
    from tests.training.conftest import varied_chat, write_jsonl

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    data = write_jsonl(tmp_path / "varied.jsonl", varied_chat(32))  # many different padded lengths
    common = {"max_steps": 8, "precision": "fp32"}
    eager = train(make_cfg(name="eager", data=data, training={**common, "compile": "off"}), tunesmith.registry())
    from torch._dynamo.utils import counters

    counters.clear()
    comp = train(make_cfg(name="comp", data=data, training={**common, "compile": "on"}), tunesmith.registry())
    le, lc = losses_of(Path(eager["run_dir"])), losses_of(Path(comp["run_dir"]))
    assert lc == pytest.approx(le, rel=1e-3, abs=1e-4)
    # one graph for both layers and all the lengths (dynamic shapes), not one per batch
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    records = tcompile.read_records()
    assert any("compile_s" in r for r in records.values()) and any("eager_s_per_token" in r for r in records.values())
    assert (tmp_path / "cache" / "inductor").is_dir()
    torch._dynamo.reset()


def test_sigkill_then_resume_in_bf16(make_cfg: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """The crash + resume equality of test_training, in bf16 (frozen base in bf16,
    LoRA and optimiser fp32). bf16 CPU kernels are deterministic, so the stated
    tolerance is the fp32 test's own: 1e-6 on the final adapter weights."""
    import signal

    import tunesmith
    from tunesmith.core.session import train
    from tests.training.test_training import _run_cli

    training = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "batch_size": 4, "lr_scheduler": "cosine",
                "warmup_steps": 1, "precision": "bf16", "compile": "off"}
    peft = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    ref = train(make_cfg(name="ref", peft=peft, training=training), tunesmith.registry())
    crash_cfg = make_cfg(name="crash", peft=peft, training=training)
    run = Path(crash_cfg.output_dir)
    proc = _run_cli(["train", str(tmp_path / "crash.yaml")])
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-2").exists():
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    resumed = _run_cli(["train", str(tmp_path / "crash.yaml"), "--resume", "--json"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "precision bf16: bf16" in out
    w_ref, w_res = _weights(Path(ref["run_dir"]) / "final"), _weights(run / "final")
    assert w_ref.keys() == w_res.keys()
    diff = max((w_ref[k] - w_res[k]).abs().max().item() for k in w_ref)
    assert diff < 1e-6, diff


def test_grpo_on_a_bf16_cpu_runs_under_autocast(tmp_path: Path, monkeypatch: Any, tiny_tokenizer_dir: Path) -> None:
    """precision auto on a bf16-capable CPU stores the GRPO policy's frozen base in
    bf16; the trainer must then run it under bf16 autocast (as SFT does), not as
    bf16 weights with autocast off."""
    import torch

    import tunesmith
    from tests.rl.conftest import PROMPTS, build_rl_tiny_model
    from tests.rl.test_train import rl_config
    from tunesmith.core import precision
    from tunesmith.core.session import train

    monkeypatch.setattr(precision, "detect_hardware", lambda: _hw(**AMX))
    monkeypatch.setattr(precision, "MIN_CPU_BF16_HIDDEN", 32)
    model_dir = build_rl_tiny_model(tmp_path / "model", tiny_tokenizer_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    from trl import GRPOTrainer

    seen: list[tuple] = []
    orig = GRPOTrainer._compute_loss

    def _compute_loss(self: Any, model: Any, *a: Any, **kw: Any) -> Any:
        autocast: list[bool] = []  # inside the policy's forward (accelerate wraps it in autocast)
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        hook = layer.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
        try:
            out = orig(self, model, *a, **kw)
        finally:
            hook.remove()
        seen.append((self.args.bf16, bool(autocast) and all(autocast),
                     {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "lora_" not in n},
                     {p.dtype for p in model.parameters() if p.requires_grad}))
        return out

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", _compute_loss)
    cfg = tunesmith.validate_config(rl_config(model_dir, prompts, tmp_path / "run", "grpo", r"^(?:a)\b", batch_size=8, num_generations=4))
    cfg.training.max_steps = 1
    cfg.training.save_steps = 0
    cfg.training.precision = "auto"
    result = train(cfg)
    assert result["steps"] == 1 and seen
    bf16_args, autocast, frozen, trained = seen[0]
    assert frozen == {torch.bfloat16} and trained == {torch.float32}  # the base (TRL's frozen 'ref' adapter aside)
    assert bf16_args and autocast
