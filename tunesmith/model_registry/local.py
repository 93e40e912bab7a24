"""The model registry: versions of trained models and their rollout stages.

One JSON file, ``versions.json``, in a registry folder. Every change is a
read-modify-write under a file lock (``versions.json.lock``) and the file is
replaced atomically, so concurrent writers (several processes) lose nothing and a
reader never sees half a file. A file that is not valid registry JSON is reported
and left untouched.

Stages: ``registered`` -> ``canary`` -> ``staging`` -> ``production`` -> ``archived``.
There is one production version (the current one) and at most one canary and one
staging version; canary and staging receive a traffic share each (default 5% and
10%, the rest goes to production). :meth:`ModelRegistry.route` picks the version
for a request id by MD5 bucket, so one client always sees the same version.
Rollback returns production to the version that was production before.

    reg = ModelRegistry("registry/")
    v = reg.register(artifacts={"adapter": "runs/x/exports/adapter"}, metrics={"ppl": 3.1})
    reg.promote(v["version"], "canary", share=0.05)
    reg.promote(v["version"], "production")
    reg.rollback()
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tunesmith.core.errors import TunesmithError
from tunesmith.core.io import atomic_write_json

STAGES = ("registered", "canary", "staging", "production", "archived")
DEFAULT_SHARES = {"canary": 0.05, "staging": 0.10}
FILE = "versions.json"
FORMAT = 1
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class RegistryError(TunesmithError):
    """A registry operation that cannot be done (unknown version, bad stage, ...)."""


class RegistryCorrupted(RegistryError):
    """versions.json exists but is not a registry file; it is left as it is."""


def validate_version_name(name: str) -> str:
    """A version name is a single safe path component: letters, digits, ``. _ + -``."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"invalid version name {name!r}",
            hint="use letters, digits, '.', '_', '+', '-' (at most 64, no '/', no '..', not starting with '.')",
        )
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _empty() -> dict:
    return {"format": FORMAT, "versions": [], "production": None, "canary": None, "staging": None,
            "shares": dict(DEFAULT_SHARES), "production_history": [], "events": []}


class ModelRegistry:
    """A registry folder holding ``versions.json``."""

    def __init__(self, path: str | Path, *, lock_timeout: float = 60.0) -> None:
        self.root = Path(path).expanduser()
        self.file = self.root / FILE
        self.lock_file = self.root / (FILE + ".lock")
        self.lock_timeout = lock_timeout

    # -- storage -----------------------------------------------------------
    def _read(self) -> dict:
        if not self.file.exists():
            return _empty()
        text = self.file.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryCorrupted(
                f"{self.file}: corrupted registry (not JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "left untouched",
                hint="restore it from a backup or fix it by hand",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
            raise RegistryCorrupted(f"{self.file}: not a tunesmith registry file (no 'versions' list); left untouched")
        if data.get("format", FORMAT) > FORMAT:
            raise RegistryCorrupted(f"{self.file}: written by a newer tunesmith (format {data['format']})")
        for k, v in _empty().items():
            data.setdefault(k, v)
        return data

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

    def load(self) -> dict:
        """The whole registry (a consistent snapshot: files are replaced atomically)."""
        return self._read()

    # -- reading -----------------------------------------------------------
    def versions(self, *, stage: str | None = None) -> list[dict]:
        vs = self._read()["versions"]
        return [v for v in vs if stage is None or v["stage"] == stage]

    def get(self, version: str) -> dict:
        validate_version_name(version)
        return self._find(self._read(), version)

    @staticmethod
    def _find(data: dict, version: str) -> dict:
        for v in data["versions"]:
            if v["version"] == version:
                return v
        known = ", ".join(v["version"] for v in data["versions"][-5:]) or "none"
        raise RegistryError(f"unknown version '{version}'", hint=f"registered: {known}")

    def production(self) -> dict | None:
        """The current production version, or None."""
        data = self._read()
        return self._find(data, data["production"]) if data["production"] else None

    def current_path(self, kind: str | None = None) -> Path | None:
        """An artefact path of the production version (the first one, or ``kind``)."""
        prod = self.production()
        if prod is None:
            return None
        arts = prod["artifacts"]
        if kind is not None:
            if kind not in arts:
                raise RegistryError(f"production version '{prod['version']}' has no '{kind}' artefact")
            return Path(arts[kind])
        return Path(next(iter(arts.values()))) if arts else None

    def traffic(self) -> dict[str, float]:
        """version -> share of requests it receives now."""
        data = self._read()
        return self._traffic(data)

    @staticmethod
    def _traffic(data: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        rest = 1.0
        for stage in ("canary", "staging"):
            v = data.get(stage)
            if v and data["production"]:
                share = float(data["shares"].get(stage, 0.0))
                out[v] = out.get(v, 0.0) + share
                rest -= share
        if data["production"]:
            out[data["production"]] = out.get(data["production"], 0.0) + max(rest, 0.0)
        return out

    def route(self, request_id: str) -> str | None:
        """The version that serves ``request_id``: MD5(id) mod 100 against the shares."""
        data = self._read()
        return self.route_in(data, request_id)

    @staticmethod
    def route_in(data: dict, request_id: str) -> str | None:
        if not data["production"]:
            return None
        bucket = int(hashlib.md5(str(request_id).encode()).hexdigest(), 16) % 100
        edge = 0.0
        for stage in ("canary", "staging"):
            v = data.get(stage)
            if v:
                edge += float(data["shares"].get(stage, 0.0)) * 100
                if bucket < edge:
                    return v
        return data["production"]

    # -- writing -----------------------------------------------------------
    def register(
        self,
        artifacts: dict[str, str | Path] | str | Path,
        *,
        version: str | None = None,
        metrics: dict | None = None,
        config_hash: str | None = None,
        base_model: str | None = None,
        metadata: dict | None = None,
        stage: str = "registered",
    ) -> dict:
        """Add a version; returns its entry. ``version`` defaults to the next ``vN``.

        ``artifacts`` maps a kind (adapter, merged, gguf, ...) to a path, or is one
        path (kind guessed from it). Every path must exist; it is stored absolute.
        """
        if not isinstance(artifacts, dict):
            artifacts = {_guess_kind(Path(artifacts)): artifacts}
        if not artifacts:
            raise RegistryError("a version needs at least one artefact path")
        arts: dict[str, str] = {}
        for kind, p in artifacts.items():
            path = Path(p).expanduser()
            if not path.exists():
                raise RegistryError(f"artefact '{kind}' does not exist: {path}")
            arts[str(kind)] = str(path.resolve())
        if version is not None:
            validate_version_name(version)
        if stage not in STAGES:
            raise RegistryError(f"unknown stage '{stage}'", hint="stages: " + ", ".join(STAGES))
        _json_safe(metrics, "metrics")
        _json_safe(metadata, "metadata")
        with self._edit() as data:
            names = {v["version"] for v in data["versions"]}
            if version is None:
                n = len(data["versions"]) + 1
                while f"v{n}" in names:
                    n += 1
                version = f"v{n}"
            elif version in names:
                raise RegistryError(f"version '{version}' is already registered")
            entry = {
                "version": version,
                "stage": "registered",
                "created_at": _now(),
                "artifacts": arts,
                "metrics": dict(metrics or {}),
                "config_hash": config_hash,
                "base_model": base_model,
                "metadata": dict(metadata or {}),
                "history": [{"stage": "registered", "at": _now()}],
            }
            data["versions"].append(entry)
            data["events"].append({"at": _now(), "event": "register", "version": version})
            if stage != "registered":
                self._set_stage(data, version, stage, None)
            return dict(self._find(data, version))

    def promote(self, version: str, stage: str, *, share: float | None = None, reason: str | None = None) -> dict:
        """Move ``version`` to ``stage``. Production makes it the current version (the
        previous one is archived and remembered for rollback); canary and staging
        take ``share`` of the traffic (defaults 0.05 and 0.10)."""
        validate_version_name(version)
        if stage not in STAGES:
            raise RegistryError(f"unknown stage '{stage}'", hint="stages: " + ", ".join(STAGES))
        if share is not None and stage not in ("canary", "staging"):
            raise RegistryError("a traffic share applies to the canary and staging stages only")
        if share is not None and not 0.0 <= share <= 1.0:
            raise RegistryError(f"share must be between 0 and 1, got {share}")
        with self._edit() as data:
            self._set_stage(data, version, stage, share, reason=reason)
            return dict(self._find(data, version))

    def set_share(self, stage: str, share: float) -> None:
        if stage not in ("canary", "staging") or not 0.0 <= share <= 1.0:
            raise RegistryError("set_share takes canary|staging and a share between 0 and 1")
        with self._edit() as data:
            data["shares"][stage] = float(share)
            if sum(data["shares"].values()) > 1.0:
                raise RegistryError("canary + staging shares exceed 1.0")
            data["events"].append({"at": _now(), "event": "share", "stage": stage, "share": share})

    def rollback(self, *, to: str | None = None, reason: str | None = None) -> dict:
        """Production returns to the previous production version (or ``to``); the
        rolled-back version is archived. Returns the new production entry."""
        if to is not None:
            validate_version_name(to)
        with self._edit() as data:
            current = data["production"]
            if current is None:
                raise RegistryError("nothing to roll back: no production version")
            if to is None:
                previous = [v for v in data["production_history"] if v != current]
                if not previous:
                    raise RegistryError(f"nothing to roll back to: '{current}' is the first production version")
                to = previous[-1]
            target = self._find(data, to)
            for kind, p in target["artifacts"].items():
                if not Path(p).exists():
                    raise RegistryError(f"cannot roll back to '{to}': its {kind} artefact is gone ({p})")
            self._set_stage(data, to, "production", None, reason=reason or f"rollback from {current}", rollback=True)
            data["events"][-1]["event"] = "rollback"
            return dict(self._find(data, to))

    # -- internals ---------------------------------------------------------
    def _set_stage(self, data: dict, version: str, stage: str, share: float | None, *, reason: str | None = None,
                   rollback: bool = False) -> None:
        entry = self._find(data, version)
        old = entry["stage"]
        if stage == "archived" and data["production"] == version:
            raise RegistryError(f"'{version}' is in production: promote another version or roll back first")
        if stage == "production":
            prev = data["production"]
            if prev and prev != version:
                pe = self._find(data, prev)
                pe["stage"] = "archived"
                pe["history"].append({"stage": "archived", "at": _now(), "reason": f"replaced by {version}"})
                if rollback:  # the rolled-back version leaves the rollback chain
                    data["production_history"] = [v for v in data["production_history"] if v != prev]
            data["production"] = version
            if not rollback:
                data["production_history"] = [v for v in data["production_history"] if v != version] + [version]
        if stage in ("canary", "staging"):
            prev = data.get(stage)
            if prev and prev != version:
                pe = self._find(data, prev)
                pe["stage"] = "registered"
                pe["history"].append({"stage": "registered", "at": _now(), "reason": f"{stage} replaced by {version}"})
            data[stage] = version
            if share is not None:
                data["shares"][stage] = float(share)
                if sum(float(data["shares"].get(s, 0.0)) for s in ("canary", "staging")) > 1.0:
                    raise RegistryError("canary + staging shares exceed 1.0")
        for pointer in ("canary", "staging"):
            if data.get(pointer) == version and stage != pointer:
                data[pointer] = None
        entry["stage"] = stage
        entry["history"].append({"stage": stage, "at": _now(), **({"from": old} if old else {}),
                                 **({"reason": reason} if reason else {}), **({"share": share} if share is not None else {})})
        data["events"].append({"at": _now(), "event": "promote", "version": version, "stage": stage, "from": old})


def _guess_kind(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / "config.json").exists():
        return "merged"
    return "artifact"


def _json_safe(obj: Any, what: str) -> None:
    if obj is None:
        return
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} must be a mapping")
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be JSON-serialisable: {exc}") from None


def run_metadata(run_dir: str | Path) -> dict:
    """What a run directory tells the registry: metrics, config hash, base model, artefacts."""
    root = Path(run_dir)
    out: dict[str, Any] = {"metrics": {}, "config_hash": None, "base_model": None, "artifacts": {}, "metadata": {"run": str(root.resolve())}}
    summary = root / "summary.json"
    if summary.exists():
        with _suppress():
            s = json.loads(summary.read_text(encoding="utf-8"))
            out["metrics"].update({k: v for k, v in (s.get("metrics") or {}).items() if isinstance(v, (int, float))})
            out["config_hash"] = s.get("config_hash")
    report = root / "eval" / "report.json"
    if report.exists():
        with _suppress():
            r = json.loads(report.read_text(encoding="utf-8"))
            flat = _flatten_numbers(r.get("metrics", r))
            out["metrics"].update(dict(list(flat.items())[:50]))
    cfg = root / "config.yaml"
    if cfg.exists() and out["config_hash"] is None:
        import yaml

        with _suppress():
            data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            out["config_hash"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    info = root / "final" / "tunesmith.json"
    if info.exists():
        with _suppress():
            i = json.loads(info.read_text(encoding="utf-8"))
            out["base_model"] = i.get("base_model_dir") or json.dumps(i.get("model"))
            out["metadata"]["method"] = (i.get("peft") or {}).get("method")
            out["metadata"]["objective"] = i.get("objective")
    exports = root / "exports"
    if exports.is_dir():
        for p in sorted(exports.iterdir()):
            if p.name.startswith("."):
                continue
            if p.name == "gguf" and p.is_dir():
                for g in sorted(p.glob("*.gguf")):
                    out["artifacts"][f"gguf-{g.stem.split('-')[-1]}" if g.stem.startswith("model-") else g.stem] = str(g)
            else:
                out["artifacts"][p.name] = str(p)
    if not out["artifacts"] and (root / "final").is_dir():
        out["artifacts"]["final"] = str(root / "final")
    return out


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, TypeError, AttributeError):
        pass


def _flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = obj
    return out
