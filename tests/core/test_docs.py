"""Every hookspec is documented in docs/plugins.md with its exact signature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tunesmith import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def all_specs():
    for mod in hookspecs.SPEC_MODULES:
        for name, func in vars(mod).items():
            if callable(func) and hasattr(func, "tunesmith_spec"):
                yield name, func


def signature_text(name, func) -> str:
    return f"{name}{inspect.signature(func)}".replace("'", "")


@pytest.mark.parametrize("name,func", list(all_specs()), ids=lambda x: x if isinstance(x, str) else "")
def test_hookspec_documented_with_exact_signature(name, func):
    text = DOC.read_text(encoding="utf-8")
    assert f"#### `{signature_text(name, func)}`" in text, f"docs/plugins.md lacks `{signature_text(name, func)}`"
    assert func.__doc__ and len(func.__doc__.strip()) > 40, f"{name} needs a docstring a plugin author can work from"


def test_no_documented_hook_is_stale():
    names = {name for name, _ in all_specs()}
    documented = [line.split("`")[1].split("(")[0] for line in DOC.read_text().splitlines() if line.startswith("#### `")]
    assert set(documented) == names


def _gen_plugin_ref():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_plugin_ref", DOC.parent / "gen_plugin_ref.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_protocol_reference_is_generated_from_the_protocols():
    gen = _gen_plugin_ref()
    assert DOC.read_text(encoding="utf-8") == gen.render(), "run: python docs/gen_plugin_ref.py"


def test_every_protocol_member_is_documented():
    """Each member core reads (required or optional) has a docstring or a #: comment."""
    assert _gen_plugin_ref().undocumented() == []
