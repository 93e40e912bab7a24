"""The generated config reference is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_current() -> None:
    gen = _load("gen_config_ref")
    text = gen.render()
    assert (DOCS / "config.md").read_text(encoding="utf-8") == text, "run: python docs/gen_config_ref.py"
    # every top-level key and every built-in PEFT method is documented
    from tunesmith.core.config import Config

    for key in Config.model_fields:
        assert f"| `{key}` |" in text
    for method in ("lora", "qlora", "full"):
        assert f"### `method: {method}`" in text
