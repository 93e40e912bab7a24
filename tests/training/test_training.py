"""Training behaviour: token-weighted accumulation, crash + resume, CPT, DDP, EOS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import losses_of, varied_chat, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TUNESMITH = str(Path(sys.executable).parent / "tunesmith")


def _weights(final: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(final.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_gradient_accumulation_equals_full_batch(make_cfg: Any, tmp_path: Path) -> None:
    """batch 8 x 1 == batch 2 x 4 accumulation (token-weighted), on very different answer lengths."""
    import torch

    import tunesmith
    from tunesmith.core.session import train

    data = write_jsonl(tmp_path / "varied.jsonl", varied_chat(8))
    common = {"max_steps": 1, "optimizer": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0, "weight_decay": 0.0}
    full = make_cfg(name="full", data=data, peft={"method": "full"}, training={**common, "batch_size": 8})
    accum = make_cfg(name="accum", data=data, peft={"method": "full"},
                     training={**common, "batch_size": 2, "gradient_accumulation_steps": 4})
    regs = tunesmith.registry()
    r1 = train(full, regs)
    r2 = train(accum, regs)
    assert losses_of(Path(r1["run_dir"]))[0] == pytest.approx(losses_of(Path(r2["run_dir"]))[0], abs=1e-5)
    w1, w2 = _weights(Path(r1["run_dir"]) / "final"), _weights(Path(r2["run_dir"]) / "final")
    base = _weights(Path(full.model.options.path))
    moved = max((w1[k] - base[k]).abs().max().item() for k in w1 if k in base)
    assert moved > 1e-4  # the step did something
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-6, diff

    # the naive average of per-micro-batch means is measurably different on this data
    from transformers import AutoTokenizer

    from tunesmith.core.models import setup_tokenizer
    from tunesmith.core.render import render_chat

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(full.model.options.path))
    counts = [render_chat(tok, r["messages"])["n_labels"] for r in varied_chat(8)]
    assert max(counts) >= 4 * min(counts)


def _run_cli(args: list[str], **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, TUNESMITH_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([TUNESMITH, *args], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_then_resume_equals_uninterrupted(make_cfg: Any, tmp_path: Path) -> None:
    import tunesmith
    from tunesmith.core.session import train

    training = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "batch_size": 4, "lr_scheduler": "cosine",
                "warmup_steps": 1}
    peft = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must resume too
    ref_cfg = make_cfg(name="ref", peft=peft, training=training)
    ref = train(ref_cfg, tunesmith.registry())

    crash_cfg = make_cfg(name="crash", peft=peft, training=training)
    cfg_path = tmp_path / "crash.yaml"
    run = Path(crash_cfg.output_dir)
    proc = _run_cli(["train", str(cfg_path)])
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-2").exists():
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert done and all((run / "checkpoints" / d / "trainer_state.json").exists() for d in done)
    for d in done:  # training state as safetensors + JSON: no pickle anywhere in a checkpoint
        names = {p.name for p in (run / "checkpoints" / d).iterdir()}
        assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors",
                "rng_state.json", "training_args.json", "adapter_model.safetensors", "COMPLETE"} <= names, names
        assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle"))], names

    resumed = _run_cli(["train", str(cfg_path), "--resume", "--json"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    result = json.loads(out[out.index("{\n"):])
    assert result["resumed_from"] and result["steps"] == 6
    w_ref, w_res = _weights(Path(ref["run_dir"]) / "final"), _weights(run / "final")
    assert w_ref.keys() == w_res.keys()
    diff = max((w_ref[k] - w_res[k]).abs().max().item() for k in w_ref)
    assert diff < 1e-6, diff
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "loss" in r and "train_loss" not in r}) == list(range(1, 7))


def test_cpt_on_raw_text_and_packing_modes(make_cfg: Any, tmp_path: Path) -> None:
    import tunesmith
    from tunesmith.core.session import train

    text = tmp_path / "corpus.jsonl"
    write_jsonl(text, [{"text": f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4)} for i in range(12)])
    cfg = make_cfg(name="cpt", data=text, objective="cpt", peft={"method": "full"},
                   training={"max_steps": 5, "max_length": 32, "learning_rate": 3e-3})
    r = train(cfg, tunesmith.registry())
    losses = losses_of(Path(r["run_dir"]))
    assert losses[-1] < losses[0]
    data = write_jsonl(tmp_path / "v.jsonl", varied_chat(16))
    for mode in (True, "padding_free", "group_by_length"):
        c = make_cfg(name=f"pack-{mode}", data=data, training={"max_steps": 3, "packing": mode})
        res = train(c, tunesmith.registry())
        assert res["steps"] == 3 and res["tokens"] > 0


def test_eval_early_stopping_and_hooks(make_cfg: Any, tmp_path: Path, tiny_chat_file: Path, tunesmith_plugin: Any) -> None:
    import tunesmith
    from tunesmith import hookimpl
    from tunesmith.core.session import train

    class Stopper:
        @hookimpl
        def after_step(self, run: Any, step: int, logs: dict) -> bool:
            return step >= 4

    tunesmith_plugin(Stopper(), "stopper")
    cfg = make_cfg(name="stop", training={"max_steps": 50, "eval_steps": 2, "save_steps": 2, "load_best_model_at_end": True,
                                           "early_stopping": {"patience": 5, "threshold": 0.0}},
                   data_extra={"validation_path": str(tiny_chat_file)})
    r = train(cfg, tunesmith.registry())
    assert r["steps"] == 4 and "eval_loss" in r and r["stop_reason"]
    rows = [json.loads(l) for l in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in x for x in rows)


@pytest.mark.distributed
def test_torchrun_two_cpu_processes(make_cfg: Any, tmp_path: Path) -> None:
    cfg = make_cfg(name="ddp", training={"max_steps": 3, "batch_size": 2})
    run = Path(cfg.output_dir)
    env = dict(os.environ, TUNESMITH_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", TUNESMITH,
         "train", str(tmp_path / "ddp.yaml")],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted((run / "ranks").glob("rank-*.json"))
    assert [json.loads(p.read_text())["rank"] for p in ranks] == [0, 1]
    assert all(json.loads(p.read_text())["steps"] == 3 and json.loads(p.read_text())["tokens"] > 0 for p in ranks)
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert len(list(run.glob("**/adapter_model.safetensors"))) == 1


@pytest.mark.slow
def test_default_model_finetunes_and_stops(tmp_path: Path) -> None:
    """The real default model: a few LoRA steps on the quickstart data; answers end with <|im_end|>."""
    import torch
    import yaml

    import tunesmith
    from tunesmith.core.models import load_trained
    from tunesmith.core.render import render_prompt
    from tunesmith.core.session import train

    rows = [json.loads(l) for l in (ROOT / "examples" / "data" / "quickstart.jsonl").read_text().splitlines()][:48]
    data = write_jsonl(tmp_path / "qs.jsonl", rows)
    cfg_path = tmp_path / "qs.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"source": "default"}, "data": {"path": str(data)},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": 24, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "max_length": 128, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "report_to": [],
                     "gradient_checkpointing": False, "early_stopping": None},
        "output_dir": str(tmp_path / "run"),
    }))
    cfg = tunesmith.load_config(cfg_path)
    r = train(cfg, tunesmith.registry())
    losses = losses_of(Path(r["run_dir"]))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    model, tok, info = load_trained(r["run_dir"])
    tok.padding_side = "left"
    prompts = [render_prompt(tok, row["messages"][:-1]) for row in rows[40:42]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=32, do_sample=False)
    for seq in out[:, enc["input_ids"].shape[1]:].tolist():
        assert tok.eos_token_id in seq, tok.decode(seq)  # it stopped before the token budget
        text = tok.decode(seq[: seq.index(tok.eos_token_id)])
        assert text.strip()


def test_checkpoints_keep_added_token_rows_not_whole_embeddings(make_cfg: Any, tmp_path: Path) -> None:
    """A template that adds tokens (llama3 on SmolLM2's vocabulary) resizes the embeddings;
    mid-run checkpoints, like the final adapter, hold the trained rows (peft trainable
    tokens), not both full embedding matrices - and a resume from one still ends where
    the uninterrupted run ends."""
    import shutil

    from safetensors import safe_open

    import tunesmith
    from tunesmith.core.session import train

    training = {"max_steps": 4, "save_steps": 2, "save_total_limit": 3}
    peft = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    ref = train(make_cfg(name="ref", peft=peft, training=training, chat_template="llama3"), tunesmith.registry())
    run = Path(ref["run_dir"])
    vocab = json.loads((run / "final" / "tokenizer.json").read_text())["added_tokens"]
    assert any(t["content"] == "<|eot_id|>" for t in vocab)
    for d in ("checkpoint-2", "checkpoint-4"):
        with safe_open(str(run / "checkpoints" / d / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert any("trainable_tokens" in k for k in shapes), shapes
        big = {k: s for k, s in shapes.items() if max(s) >= 49152}
        assert not big, big  # no [vocab, hidden] matrix in a checkpoint
    # a crash after checkpoint-2: resume from it
    crashed = tmp_path / "run-crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-4")
    cfg = make_cfg(name="crashed", peft=peft, training=training, chat_template="llama3")
    res = train(cfg, tunesmith.registry(), resume=True)
    assert res["resumed_from"] and res["steps"] == 4
    w_ref, w_res = _weights(run / "final"), _weights(Path(res["run_dir"]) / "final")
    assert w_ref.keys() == w_res.keys()
    assert max((w_ref[k] - w_res[k]).abs().max().item() for k in w_ref) < 1e-6
