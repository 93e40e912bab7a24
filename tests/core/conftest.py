"""Helpers to fake installed plugin distributions (a dist-info folder on sys.path)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from tunesmith.core import plugins


def make_dist(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0") -> Path:
    """Write modules and a ``<dist>-<version>.dist-info`` with tunesmith entry points under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    eps = "[tunesmith]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps, encoding="utf-8")
    return root


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """``add(dist, modules, entry_points)`` installs a fake distribution for this test."""
    added: list[str] = []
    names: list[str] = []

    def add(dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0") -> Path:
        root = make_dist(tmp_path / dist, dist, modules, entry_points, version)
        sys.path.insert(0, str(root))
        added.append(str(root))
        # hermetic: only the fake distributions' entry points load
        names.extend(entry_points)
        monkeypatch.setenv(plugins.ENV_ALLOW, ",".join(names))
        for name in modules:
            sys.modules.pop(name, None)
        plugins.reset()
        return root

    yield add
    for p in added:
        if p in sys.path:
            sys.path.remove(p)
    plugins.reset()
