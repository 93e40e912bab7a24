"""The ``local`` registry back-end: one ``versions.json`` in a registry folder.

Every change is a read-modify-write under a file lock (``versions.json.lock``) and
the file is replaced atomically, so concurrent writers (several processes) lose
nothing and a reader never sees half a file. A file that is not valid registry
JSON is reported (with line and column) and left untouched.

The rules (stages, shares, routing, rollback) are :mod:`tunesmith.model_registry.state`'s,
the same for every back-end::

    reg = ModelRegistry("registry/")
    v = reg.register(artifacts={"adapter": "runs/x/exports/adapter"}, metrics={"ppl": 3.1})
    reg.promote(v["version"], "canary", share=0.05)
    reg.promote(v["version"], "production")
    reg.rollback()
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tunesmith.core.io import atomic_write_json
from tunesmith.model_registry.state import (  # noqa: F401 - re-exported (older imports)
    DEFAULT_SHARES,
    FORMAT,
    STAGES,
    VERSION_RE,
    RegistryCorrupted,
    RegistryError,
    RegistryStore,
    add_event,
    check_state,
    empty_state,
    find,
    guess_kind as _guess_kind,
    new_entry,
    next_version_name,
    run_metadata,
    set_stage,
    validate_version_name,
)

FILE = "versions.json"


class ModelRegistry(RegistryStore):
    """A registry folder holding ``versions.json``."""

    def __init__(self, path: str | Path, *, lock_timeout: float = 60.0) -> None:
        self.root = Path(path).expanduser()
        self.file = self.root / FILE
        self.lock_file = self.root / (FILE + ".lock")
        self.lock_timeout = lock_timeout
        self.location = str(self.root)

    # -- storage -----------------------------------------------------------
    def _read(self) -> dict:
        if not self.file.exists():
            return empty_state()
        text = self.file.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryCorrupted(
                f"{self.file}: corrupted registry (not JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "left untouched",
                hint="restore it from a backup or fix it by hand",
            ) from None
        return check_state(data, str(self.file))

    @contextmanager
    def _edit(self) -> Iterator[dict]:
        """Read under the lock, let the caller change the data, write it back atomically."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.lock_file), timeout=self.lock_timeout):
                data = self._read()
                yield data
                atomic_write_json(self.file, data)
        except Timeout:
            raise RegistryError(f"{self.lock_file}: could not take the registry lock in {self.lock_timeout:g} s") from None

    def _insert(self, arts: dict[str, str], version: str | None, fields: dict, stage: str) -> dict:
        with self._edit() as data:
            names = {v["version"] for v in data["versions"]}
            if version is None:
                version = next_version_name(names, len(data["versions"]) + 1)
            elif version in names:
                raise RegistryError(f"version '{version}' is already registered")
            data["versions"].append(new_entry(version, arts, **fields))
            add_event(data, {"event": "register", "version": version})
            if stage != "registered":
                set_stage(data, version, stage, None)
            return dict(find(data, version))

