"""Blinded sheets: export, fill, import, unblind, score; Krippendorff's alpha vs the package."""

import csv
import json

import krippendorff
import numpy as np
import pytest

from tunesmith.core.errors import DataError
from tunesmith.human_eval.sheets import (
    CRITERIA,
    export_sheet,
    import_ratings,
    krippendorff_alpha,
    read_key,
    read_sheet,
    reliability_matrix,
    score,
)

ITEMS = [{"prompt": f"Question {i}?", "reference": f"Answer {i}."} for i in range(12)]
OUTPUTS = {
    "base": [f"base says {i}" for i in range(12)],
    "tuned": [f"tuned says {i}" for i in range(12)],
    "gpt": [f"gpt says {i}" for i in range(12)],
}


@pytest.mark.parametrize("level", ["ordinal", "interval", "nominal"])
def test_alpha_matches_krippendorff_package(level):
    rng = np.random.default_rng(7)
    for _ in range(20):
        data = rng.integers(1, 6, size=(rng.integers(2, 5), rng.integers(5, 30))).astype(float)
        data[rng.random(data.shape) < 0.25] = np.nan
        try:
            ref = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        except ValueError:  # no pairable unit: alpha is undefined
            assert np.isnan(krippendorff_alpha(data.tolist(), level))
            continue
        assert krippendorff_alpha(data.tolist(), level) == pytest.approx(ref, abs=1e-12)


def test_alpha_hand_computed():
    # two raters, three units: (1,1), (2,2), (1,2). Coincidences: o11 = 2, o22 = 2, o12 = o21 = 1; n = 6
    # interval: D_o ~ 2 * 1, D_e ~ 2 * 3 * 3 / 5 -> alpha = 1 - 5 * 2 / 18 = 4/9
    assert krippendorff_alpha([[1, 2, 1], [1, 2, 2]], "interval") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3]], "ordinal") == pytest.approx(1.0)


def _fill(sheet_rows, key, rater, fn):
    out = []
    for row in sheet_rows:
        row = json.loads(json.dumps(row))
        for o in row["outputs"]:
            model = key["items"][row["item_id"]][o["label"]]
            row["scores"][o["label"]] = {c: fn(model, row["item_id"], c) for c in CRITERIA}
        row["rater"] = rater
        out.append(row)
    return out


def test_blinding_and_unblinding_round_trip(tmp_path):
    paths = export_sheet(ITEMS, OUTPUTS, tmp_path / "he", n=8, seed=3)
    sheet, key = read_sheet(paths["sheet"]), read_key(paths["key"])
    assert len(sheet) == 8
    text = paths["sheet"].read_text() + paths["csv"].read_text()
    for name in OUTPUTS:
        assert f'"{name}"' not in paths["sheet"].read_text()
        assert name not in {o["label"] for r in sheet for o in r["outputs"]}
    assert "base says" in text  # outputs are there, names are not
    # the order is random per item, and every output text belongs to the model the key names
    orders = {tuple(key["items"][r["item_id"]][o["label"]] for o in r["outputs"]) for r in sheet}
    assert len(orders) > 1
    for r in sheet:
        src = key["source_rows"][r["item_id"]]
        assert r["prompt"] == ITEMS[src]["prompt"]
        for o in r["outputs"]:
            assert o["text"] == OUTPUTS[key["items"][r["item_id"]][o["label"]]][src]
    # two raters fill the JSONL with scores that depend on the (hidden) model
    quality = {"base": 2, "tuned": 4, "gpt": 5}
    a = _fill(sheet, key, "alice", lambda m, i, c: quality[m])
    b = _fill(sheet, key, "bob", lambda m, i, c: quality[m] - (1 if (i.endswith("1") and c == "coherence") else 0))
    fa, fb = tmp_path / "alice.jsonl", tmp_path / "bob.jsonl"
    fa.write_text("".join(json.dumps(r) + "\n" for r in a))
    fb.write_text("".join(json.dumps(r) + "\n" for r in b))
    ratings = import_ratings([fa, fb], paths["key"])
    assert len(ratings) == 2 * 8 * 3 * 3
    assert all(r.score == quality[r.model] for r in ratings if r.rater == "alice")
    summary = score(ratings)
    assert summary["ranking"] == ["gpt", "tuned", "base"]
    assert summary["per_model"]["tuned"]["relevance"]["mean"] == pytest.approx(4.0)
    # alpha of the summary = the package on the same raters x units matrix
    for crit in CRITERIA:
        mat, raters, units = reliability_matrix(ratings, crit)
        arr = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)
        for level in ("ordinal", "interval"):
            ref = krippendorff.alpha(reliability_data=arr, level_of_measurement=level)
            assert summary["alpha"][crit][level] == pytest.approx(ref, abs=1e-12)
    assert summary["alpha"]["relevance"]["interval"] == pytest.approx(1.0)
    assert summary["alpha"]["coherence"]["interval"] < 1.0


def test_filled_csv_imports_and_blank_cells_are_skipped(tmp_path):
    paths = export_sheet(ITEMS[:3], {"x": ["1", "2", "3"], "y": ["4", "5", "6"]}, tmp_path / "he", seed=1)
    key = read_key(paths["key"])
    rows = list(csv.DictReader(paths["csv"].open()))
    for r in rows:
        model = key["items"][r["item_id"]][r["label"]]
        r["relevance"] = "5" if model == "y" else "1"
        r["rater"] = "carol"
    rows[0]["coherence"] = "3"
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ratings = import_ratings([filled], paths["key"])
    assert len(ratings) == 6 + 1
    assert {(r.model, r.score) for r in ratings if r.criterion == "relevance"} == {("x", 1), ("y", 5)}


@pytest.mark.parametrize("bad", ["6", "0", "3.5", "good"])
def test_rating_outside_scale_names_file_and_row(tmp_path, bad):
    paths = export_sheet(ITEMS[:2], {"x": ["1", "2"]}, tmp_path / "he", seed=1)
    rows = list(csv.DictReader(paths["csv"].open()))
    rows[1]["correctness"] = bad
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"filled\.csv:3: rating .* correctness of output A"):
        import_ratings([filled], paths["key"])


def test_unknown_item_and_empty_file(tmp_path):
    paths = export_sheet(ITEMS[:2], {"x": ["1", "2"]}, tmp_path / "he")
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps({"item_id": "item-9999", "scores": {}}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl:1: unknown item"):
        import_ratings([f], paths["key"])
    f.write_text("")
    with pytest.raises(DataError, match="empty"):
        import_ratings([f], paths["key"])


def test_export_refuses_to_overwrite(tmp_path):
    export_sheet(ITEMS[:2], {"x": ["1", "2"]}, tmp_path / "he")
    from tunesmith.core.errors import TunesmithError

    with pytest.raises(TunesmithError, match="already"):
        export_sheet(ITEMS[:2], {"x": ["1", "2"]}, tmp_path / "he")
