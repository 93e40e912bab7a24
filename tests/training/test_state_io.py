"""Optimiser, scheduler and RNG state round trips through safetensors + JSON."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_and_scheduler_resume_exactly(tmp_path: Path, fused: bool) -> None:
    import torch
    from transformers import get_scheduler

    from tunesmith.core import state_io

    def make() -> tuple:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, fused=fused)
        sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
        return model, opt, sched

    def step(model, opt, sched, i) -> None:  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    ref, opt_r, sch_r = make()
    for i in range(6):
        step(ref, opt_r, sch_r, i)

    model, opt, sched = make()
    for i in range(3):
        step(model, opt, sched, i)
    state_io.save_optimizer(opt, tmp_path)
    state_io.save_state_dict_json(sched, tmp_path / state_io.SCHEDULER_FILE)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors", "scheduler.json"]

    model2, opt2, sched2 = make()
    model2.load_state_dict(weights)
    assert state_io.has_optimizer(tmp_path)
    state_io.load_optimizer(opt2, tmp_path)
    state_io.load_state_dict_json(sched2, tmp_path / state_io.SCHEDULER_FILE)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for i in range(3, 6):
        step(model2, opt2, sched2, i)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert sched2.get_last_lr() == sch_r.get_last_lr()


def test_rng_state_round_trip(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from tunesmith.core import state_io

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(3)
    state_io.save_rng_state(tmp_path, rank=1)
    expected = (random.random(), float(np.random.rand()), torch.rand(5))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert not state_io.load_rng_state(tmp_path)  # rank 1 wrote rng_state_1.*
    assert state_io.load_rng_state(tmp_path, rank=1)
    got = (random.random(), float(np.random.rand()), torch.rand(5))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_plain_trainer_checkpoint_still_resumes(make_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint holding transformers' own files (optimizer.pt, scheduler.pt,
    rng_state.pth) resumes to the same weights as tunesmith's format."""
    import json
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import load_file

    import tunesmith
    from tunesmith.core import state_io
    from tunesmith.core.session import train

    training = {"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "lr_scheduler": "cosine", "warmup_steps": 1}
    peft = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    ours = make_cfg(name="ours", peft=peft, training={**training, "max_steps": 2})
    train(ours, tunesmith.registry())
    plain = make_cfg(name="plain", peft=peft, training=training)
    shutil.copytree(ours.output_dir, plain.output_dir)
    ours = make_cfg(name="ours", peft=peft, training=training)

    # rewrite the copy's checkpoint the way transformers' Trainer writes it
    ckpt = Path(plain.output_dir) / "checkpoints" / "checkpoint-2"
    opt_meta = json.loads((ckpt / "optimizer.json").read_text())
    state: dict = {}
    for key, v in load_file(str(ckpt / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for g in opt_meta["param_groups"]:
        g["betas"] = tuple(g["betas"])
    torch.save({"state": state, "param_groups": opt_meta["param_groups"]}, ckpt / "optimizer.pt")
    torch.save(json.loads((ckpt / "scheduler.json").read_text()), ckpt / "scheduler.pt")
    rng = json.loads((ckpt / "rng_state.json").read_text())
    version, mt, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    torch.save({"python": (version, tuple(mt), gauss),
                "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
                "cpu": load_file(str(ckpt / "rng_state.safetensors"))["cpu"]}, ckpt / "rng_state.pth")
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors", "rng_state.json"):
        (ckpt / name).unlink()
    assert not state_io.has_optimizer(ckpt)

    a = train(ours, tunesmith.registry(), resume=True)
    b = train(plain, tunesmith.registry(), resume=True)
    assert a["resumed_from"].endswith("checkpoint-2") and b["resumed_from"].endswith("checkpoint-2")
    wa = load_file(str(Path(a["run_dir"]) / "final" / "adapter_model.safetensors"))
    wb = load_file(str(Path(b["run_dir"]) / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
