"""KTO: the data format, the loss against TRL's KTOTrainer on the same batch, the
collator's KL pairs, and a run on the tiny model whose preference accuracy on
held-out pairs beats the reference."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import tunesmith  # noqa: E402
from tunesmith.core.errors import ConfigError, DataError  # noqa: E402
from tunesmith.plugins.data.kto import KTOFormat, parse_label, split_completion, unpair_records  # noqa: E402
from tunesmith.plugins.objectives.kto import UnpairedCollator, kto_logs, kto_loss  # noqa: E402

from .conftest import HELD_OUT_PAIRS, TRAIN_PAIRS, metrics, preference_accuracy, run_config, write_jsonl  # noqa: E402


# --------------------------------------------------------------------------- data format
def test_format_reads_validates_and_converts(tmp_path: Path) -> None:
    from tunesmith.core.data import load_records, write_records

    rows = [
        {"prompt": "Route: card declined", "completion": '{"team": "billing"}', "label": True},
        {"prompt": [{"role": "user", "content": "Route: parcel lost"}], "completion": "Sorry to hear!", "label": "false"},
        {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello"}], "label": 1, "system": "Be brief.", "team": "x"},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    recs = load_records(path)  # format detected
    assert [r["metadata"]["label"] for r in recs] == [True, False, True]
    assert recs[2]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert recs[2]["metadata"]["team"] == "x"  # extra columns kept
    prompt, completion, label = split_completion(recs[1])
    assert prompt == [{"role": "user", "content": "Route: parcel lost"}] and completion[0]["content"] == "Sorry to hear!"
    assert label is False
    out = write_records(recs, tmp_path / "back.jsonl", format="kto")
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert {k: v for k, v in back[0].items() if k != "metadata"} == {
        "prompt": "Route: card declined", "completion": '{"team": "billing"}', "label": True}
    assert not back[0].get("metadata")  # the label is not repeated in metadata
    assert back[1]["label"] is False and "label" not in back[2].get("metadata", {})

    fmt = KTOFormat()
    assert fmt.detect(rows[0]) and not fmt.detect({"prompt": "x", "chosen": "a", "rejected": "b"})
    assert any("label" in p for p in fmt.validate({"prompt": "x", "completion": "y", "label": "maybe"}))
    assert any("assistant turns only" in p for p in fmt.validate(
        {"prompt": "x", "completion": [{"role": "user", "content": "y"}], "label": True}))
    assert any("must not end with an assistant" in p for p in fmt.validate(
        {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "completion": "z", "label": True}))
    assert [parse_label(v) for v in (True, 0, "TRUE", "no", "2", None)] == [True, False, True, False, None, None]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y", "label": "perhaps"}])
    with pytest.raises(DataError, match="label"):
        load_records(bad)


def test_unpair_preference_pairs() -> None:
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], "metadata": {"source": "f", "line": 3}}
    good, bad = list(unpair_records([pair]))
    assert good["messages"][-1]["content"] == "good" and good["metadata"] == {"source": "f", "line": 3, "label": True}
    assert bad["messages"][-1]["content"] == "bad" and bad["metadata"]["label"] is False
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "metadata": {"label": True}}
    assert list(unpair_records([chat])) == [chat]
    with pytest.raises(DataError, match="no feedback label"):
        split_completion({"messages": chat["messages"], "metadata": {}})


# --------------------------------------------------------------------------- numerics vs TRL
class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _batch(seed: int, B: int = 8, T: int = 12):
    g = torch.Generator().manual_seed(seed)

    def mask():
        m = torch.zeros(B, T, dtype=torch.long)
        for i in range(B):
            s = int(torch.randint(2, 5, (1,), generator=g))
            e = int(torch.randint(s + 1, T + 1, (1,), generator=g))
            m[i, s:e] = 1
        return m

    def tok(m):  # per-token log-probs, 0 outside the completion (as TRL's fused head gives)
        return -torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 3 * m[:, 1:].double()

    cm, kl_cm = mask(), mask()
    labels = torch.rand(B, generator=g) > 0.4
    labels[0], labels[1] = True, False  # both kinds present
    return {"cm": cm, "kl_cm": kl_cm, "labels": labels, "pol": tok(cm), "ref": tok(cm), "kl_pol": tok(kl_cm), "kl_ref": tok(kl_cm)}


def _trl_kto(b: dict, *, loss_type: str, beta: float, dw: float, uw: float) -> tuple[float, dict]:
    from trl.trainer.kto_trainer import KTOTrainer

    B, T = b["cm"].shape
    ids, kl_ids = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)

    def model(**kw):
        lp = b["kl_pol"] if kw["input_ids"] is kl_ids else b["pol"]
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))

    model.training = True
    shim = SimpleNamespace(
        model=model, accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=dw, undesirable_weight=uw,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    shim._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(shim, m, batch)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "completion_mask": b["cm"],
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(B, T, dtype=torch.long), "KL_completion_mask": b["kl_cm"],
        "label": b["labels"].clone(), "ref_logps": b["ref"].sum(1), "ref_KL_logps": b["kl_ref"].sum(1),
    }
    loss = KTOTrainer._compute_loss(shim, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in shim._metrics["train"].items()}


@pytest.mark.parametrize(("loss_type", "beta", "dw", "uw"), [
    ("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 1.0), ("kto", 2.0, 1.0, 0.7), ("apo_zero_unpaired", 0.1, 1.0, 1.0),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_matches_trl(loss_type: str, beta: float, dw: float, uw: float, seed: int) -> None:
    b = _batch(seed)
    trl_loss, trl = _trl_kto(b, loss_type=loss_type, beta=beta, dw=dw, uw=uw)
    pol = b["pol"].sum(1)
    args = (pol, b["ref"].sum(1), b["labels"], b["kl_pol"].sum(1), b["kl_ref"].sum(1))
    losses, cr, rr, kl = kto_loss(*args, beta=beta, loss_type=loss_type, desirable_weight=dw, undesirable_weight=uw)
    ours = kto_logs(losses, cr, rr, kl, pol[b["labels"]], pol[~b["labels"]])
    assert float(losses.nanmean()) == pytest.approx(trl_loss, abs=1e-5)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), key
    if loss_type == "kto":
        assert ours["kl"] > 0 or (b["kl_pol"].sum(1) - b["kl_ref"].sum(1)).mean() <= 0
    # the check can fail: another beta gives another loss
    other = kto_loss(*args, beta=beta * 2, loss_type=loss_type, desirable_weight=dw, undesirable_weight=uw)[0]
    assert abs(float(other.nanmean()) - trl_loss) > 1e-4


def test_kl_reference_point_is_clamped_and_detached() -> None:
    pol = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0])
    kl_pol, kl_ref = torch.tensor([-3.0, -3.0]), torch.tensor([-1.0, -1.0])  # negative estimate -> 0
    losses, _, _, kl = kto_loss(pol, ref, torch.tensor([True, False]), kl_pol, kl_ref, beta=1.0)
    assert float(kl) == 0.0
    losses.mean().backward()
    assert pol.grad is not None and torch.all(pol.grad != 0)


def test_collator_builds_trl_kl_rotation() -> None:
    feats = [{"prompt_ids": [10 + i] * 2, "completion_ids": [20 + i] * 3, "completion_mask": [1, 1, 1], "label": i % 2 == 0}
             for i in range(3)]
    b = UnpairedCollator(0, max_length=64)(feats)
    assert b["input_ids"][1].tolist() == [11, 11, 21, 21, 21]
    # (x_1, y_n), (x_2, y_1), (x_3, y_2)
    assert [r[:5].tolist() for r in b["KL_input_ids"]] == [[10, 10, 22, 22, 22], [11, 11, 20, 20, 20], [12, 12, 21, 21, 21]]
    assert b["KL_completion_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert b["label"].tolist() == [True, False, True]
    assert b["labels"][0].tolist() == [-100, -100, 20, 20, 20]
    # too long: the prompt is cut from the left, the completion kept
    short = UnpairedCollator(0, max_length=4)(feats)
    assert short["KL_input_ids"][0].tolist() == [10, 22, 22, 22]


# --------------------------------------------------------------------------- training
def test_kto_on_preference_pairs_beats_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Preference pairs, unpaired by the objective; held-out preference accuracy > 0.5."""
    from tunesmith.core.session import train

    data = write_jsonl(tmp_path / "pairs.jsonl", TRAIN_PAIRS)
    run = tmp_path / "run"
    cfg = run_config(tiny_model_dir, data, run, "kto", losses=[{"name": "kto", "beta": 0.1}], max_steps=12, save_steps=6)
    result = train(tunesmith.validate_config(cfg))
    assert result["steps"] == 12 and result["desirable"] == result["undesirable"] == 12
    rows = [r for r in metrics(run) if "kto/kl" in r]
    assert rows and all(r["kto/kl"] >= 0 for r in rows)
    assert rows[-1]["kto/rewards/margins"] > 0
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] == "kto" and (run / "final" / "adapter_model.safetensors").exists()
    ckpt = run / "checkpoints" / "checkpoint-6"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "optimizer.safetensors").exists()
    acc = preference_accuracy(run, HELD_OUT_PAIRS, implicit_reward=True)
    assert acc["base_accuracy"] == 0.0  # the reference scores every pair 0
    assert acc["accuracy"] > 0.5 and acc["margin"] > 0, acc
    print("kto held-out preference accuracy", acc)
    # resume from the last checkpoint (step 12) to step 14
    cfg["training"]["max_steps"] = 14
    again = train(tunesmith.validate_config(cfg), resume=True)
    assert again["resumed_from"].endswith("checkpoint-12") and again["steps"] == 14


def test_kto_unpaired_rows_and_config_checks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Unbalanced thumbs-up/down rows train; batch size 1 is refused for the KL estimate."""
    from tunesmith.core.session import train

    rows = []
    for p in TRAIN_PAIRS[:6]:
        rows.append({"prompt": p["prompt"][0]["content"], "completion": p["chosen"][0]["content"], "label": True})
        rows.append({"prompt": p["prompt"][0]["content"], "completion": p["rejected"][0]["content"], "label": False})
    rows += [{"prompt": "Say hi.", "completion": "Hi.", "label": True}] * 2
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", "kto", max_steps=2,
                     losses=[{"name": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.2}, {"name": "l2_sp", "weight": 0.1}])
    result = train(tunesmith.validate_config(cfg))
    assert result["desirable"] == 8 and result["undesirable"] == 6 and result["steps"] == 2
    logged = metrics(tmp_path / "run")
    assert any("loss/kto" in r and "loss/l2_sp" in r for r in logged)  # composes with a regulariser
    bad = run_config(tiny_model_dir, data, tmp_path / "run2", "kto", batch_size=1)
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        train(tunesmith.validate_config(bad))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match="no feedback label"):
        train(tunesmith.validate_config(run_config(tiny_model_dir, chat, tmp_path / "run3", "kto")))
    wrong = run_config(tiny_model_dir, data, tmp_path / "run4", "dpo", losses=[{"name": "kto"}])
    with pytest.raises(ConfigError, match="objectives that give them: kto"):
        train(tunesmith.validate_config(wrong))
