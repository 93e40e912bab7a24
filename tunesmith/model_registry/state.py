"""The registry's rules, shared by every back-end.

A registry's state is one plain mapping (what the local back-end keeps in
``versions.json``)::

    {"format": 1,
     "versions": [{"version", "stage", "created_at", "artifacts", "metrics",
                   "config_hash", "base_model", "metadata", "history"}, ...],
     "production": "v3", "canary": "v4", "staging": None,
     "shares": {"canary": 0.05, "staging": 0.10},
     "production_history": ["v1", "v3"],
     "events": [...]}

:class:`RegistryStore` implements every operation (register, promote, rollback,
traffic shares, routing) on that mapping; a back-end supplies only how the mapping
is read (:meth:`RegistryStore._read`), how a change is written back under a lock
(:meth:`RegistryStore._edit`) and how a new version is added
(:meth:`RegistryStore._insert`). So the local versions.json and the MLflow Model
Registry follow exactly the same rules, and one test suite runs against both.

Stages: ``registered`` -> ``canary`` -> ``staging`` -> ``production`` -> ``archived``.
There is one production version and at most one canary and one staging version;
canary and staging each take a traffic share (default 5% and 10%; the rest goes to
production). Requests are routed by MD5(request id) mod 100 against those shares,
so one client always sees the same version. Rollback returns production to the
version that was production before it.
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

STAGES = ("registered", "canary", "staging", "production", "archived")
DEFAULT_SHARES = {"canary": 0.05, "staging": 0.10}
FORMAT = 1
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: the newest events kept in the state (the per-version history is kept in full)
MAX_EVENTS = 1000


class RegistryError(TunesmithError):
    """A registry operation that cannot be done (unknown version, bad stage, ...)."""


class RegistryCorrupted(RegistryError):
    """The store exists but does not hold a registry; it is left as it is."""


def validate_version_name(name: str) -> str:
    """A version name is a single safe path component: letters, digits, ``. _ + -``."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"invalid version name {name!r}",
            hint="use letters, digits, '.', '_', '+', '-' (at most 64, no '/', no '..', not starting with '.')",
        )
    return name


def validate_stage(stage: str) -> str:
    if stage not in STAGES:
        raise RegistryError(f"unknown stage '{stage}'", hint="stages: " + ", ".join(STAGES))
    return stage


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def empty_state() -> dict:
    return {"format": FORMAT, "versions": [], "production": None, "canary": None, "staging": None,
            "shares": dict(DEFAULT_SHARES), "production_history": [], "events": []}


def find(data: dict, version: str) -> dict:
    for v in data["versions"]:
        if v["version"] == version:
            return v
    known = ", ".join(v["version"] for v in data["versions"][-5:]) or "none"
    raise RegistryError(f"unknown version '{version}'", hint=f"registered: {known}")


def traffic_of(data: dict) -> dict[str, float]:
    """version -> share of requests it receives."""
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


def route_in(data: dict, request_id: str) -> str | None:
    """The version that serves ``request_id``: MD5(id) mod 100 against the shares."""
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


def add_event(data: dict, event: dict) -> None:
    data["events"].append({"at": now(), **event})
    if len(data["events"]) > MAX_EVENTS:
        del data["events"][: len(data["events"]) - MAX_EVENTS]


def new_entry(version: str, arts: dict[str, str], *, metrics: dict | None, config_hash: str | None,
              base_model: str | None, metadata: dict | None) -> dict:
    return {
        "version": version,
        "stage": "registered",
        "created_at": now(),
        "artifacts": arts,
        "metrics": dict(metrics or {}),
        "config_hash": config_hash,
        "base_model": base_model,
        "metadata": dict(metadata or {}),
        "history": [{"stage": "registered", "at": now()}],
    }


def next_version_name(taken: set[str], start: int) -> str:
    n = start
    while f"v{n}" in taken:
        n += 1
    return f"v{n}"


def set_stage(data: dict, version: str, stage: str, share: float | None, *, reason: str | None = None,
              rollback: bool = False) -> None:
    """Move ``version`` to ``stage`` in ``data`` (the one place the stage rules live)."""
    entry = find(data, version)
    old = entry["stage"]
    if stage == "archived" and data["production"] == version:
        raise RegistryError(f"'{version}' is in production: promote another version or roll back first")
    if stage == "production":
        prev = data["production"]
        if prev and prev != version:
            pe = find(data, prev)
            pe["stage"] = "archived"
            pe["history"].append({"stage": "archived", "at": now(), "reason": f"replaced by {version}"})
            if rollback:  # the rolled-back version leaves the rollback chain
                data["production_history"] = [v for v in data["production_history"] if v != prev]
        data["production"] = version
        if not rollback:
            data["production_history"] = [v for v in data["production_history"] if v != version] + [version]
    if stage in ("canary", "staging"):
        prev = data.get(stage)
        if prev and prev != version:
            pe = find(data, prev)
            pe["stage"] = "registered"
            pe["history"].append({"stage": "registered", "at": now(), "reason": f"{stage} replaced by {version}"})
        data[stage] = version
        if share is not None:
            data["shares"][stage] = float(share)
            if sum(float(data["shares"].get(s, 0.0)) for s in ("canary", "staging")) > 1.0:
                raise RegistryError("canary + staging shares exceed 1.0")
    for pointer in ("canary", "staging"):
        if data.get(pointer) == version and stage != pointer:
            data[pointer] = None
    entry["stage"] = stage
    entry["history"].append({"stage": stage, "at": now(), **({"from": old} if old else {}),
                             **({"reason": reason} if reason else {}), **({"share": share} if share is not None else {})})
    add_event(data, {"event": "promote", "version": version, "stage": stage, "from": old})


def check_state(data: Any, where: str) -> dict:
    """``data`` as a registry state with every key present; RegistryCorrupted if it is none."""
    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise RegistryCorrupted(f"{where}: not a tunesmith registry (no 'versions' list); left untouched")
    if not isinstance(data.get("format", FORMAT), int) or data.get("format", FORMAT) > FORMAT:
        raise RegistryCorrupted(f"{where}: written by a newer tunesmith (format {data.get('format')})")
    for k, v in empty_state().items():
        data.setdefault(k, v)
    for v in data["versions"]:
        if not isinstance(v, dict) or not isinstance(v.get("version"), str) or not isinstance(v.get("artifacts"), dict):
            raise RegistryCorrupted(f"{where}: a version entry is malformed ({str(v)[:80]}); left untouched")
    return data


def json_safe(obj: Any, what: str) -> None:
    if obj is None:
        return
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} must be a mapping")
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be JSON-serialisable: {exc}") from None


def guess_kind(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / "config.json").exists():
        return "merged"
    return "artifact"


def normalise_artifacts(artifacts: dict[str, str | Path] | str | Path) -> dict[str, str]:
    """Kind -> absolute path, every path checked to exist."""
    if not isinstance(artifacts, dict):
        artifacts = {guess_kind(Path(artifacts)): artifacts}
    if not artifacts:
        raise RegistryError("a version needs at least one artefact path")
    arts: dict[str, str] = {}
    for kind, p in artifacts.items():
        path = Path(p).expanduser()
        if not path.exists():
            raise RegistryError(f"artefact '{kind}' does not exist: {path}")
        arts[str(kind)] = str(path.resolve())
    return arts


class RegistryStore:
    """Every registry operation, on top of three storage primitives a back-end supplies.

    * ``_read() -> dict``: a consistent snapshot of the state;
    * ``_edit()``: a context manager that yields the state under the back-end's
      lock and writes back what the caller changed (nothing when it raises);
    * ``_insert(arts, version, fields, stage) -> dict``: add one version (named
      ``version``, or the next free ``vN``), put it in ``stage``, return its entry.

    ``location`` says where the store is (a folder, a tracking URI + model name).
    """

    location: str = ""

    # -- storage (back-ends) -------------------------------------------------
    def _read(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextmanager
    def _edit(self) -> Iterator[dict]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield {}

    def _insert(self, arts: dict[str, str], version: str | None, fields: dict, stage: str) -> dict:  # pragma: no cover
        raise NotImplementedError

    # -- reading -----------------------------------------------------------
    def load(self) -> dict:
        """The whole registry state (a consistent snapshot)."""
        return self._read()

    def versions(self, *, stage: str | None = None) -> list[dict]:
        return [v for v in self._read()["versions"] if stage is None or v["stage"] == stage]

    def get(self, version: str) -> dict:
        validate_version_name(version)
        return find(self._read(), version)

    # kept as static methods: callers holding a snapshot use them without a read
    _find = staticmethod(find)
    _traffic = staticmethod(traffic_of)
    route_in = staticmethod(route_in)

    def production(self) -> dict | None:
        """The current production version, or None."""
        data = self._read()
        return find(data, data["production"]) if data["production"] else None

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
        return traffic_of(self._read())

    def route(self, request_id: str) -> str | None:
        """The version that serves ``request_id``."""
        return route_in(self._read(), request_id)

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
        arts = normalise_artifacts(artifacts)
        if version is not None:
            validate_version_name(version)
        validate_stage(stage)
        json_safe(metrics, "metrics")
        json_safe(metadata, "metadata")
        fields = {"metrics": metrics, "config_hash": config_hash, "base_model": base_model, "metadata": metadata}
        return self._insert(arts, version, fields, stage)

    def promote(self, version: str, stage: str, *, share: float | None = None, reason: str | None = None) -> dict:
        """Move ``version`` to ``stage``. Production makes it the current version (the
        previous one is archived and remembered for rollback); canary and staging
        take ``share`` of the traffic (defaults 0.05 and 0.10)."""
        validate_version_name(version)
        validate_stage(stage)
        if share is not None and stage not in ("canary", "staging"):
            raise RegistryError("a traffic share applies to the canary and staging stages only")
        if share is not None and not 0.0 <= share <= 1.0:
            raise RegistryError(f"share must be between 0 and 1, got {share}")
        with self._edit() as data:
            set_stage(data, version, stage, share, reason=reason)
            return dict(find(data, version))

    def set_share(self, stage: str, share: float) -> None:
        if stage not in ("canary", "staging") or not 0.0 <= share <= 1.0:
            raise RegistryError("set_share takes canary|staging and a share between 0 and 1")
        with self._edit() as data:
            data["shares"][stage] = float(share)
            if sum(float(v) for v in data["shares"].values()) > 1.0:
                raise RegistryError("canary + staging shares exceed 1.0")
            add_event(data, {"event": "share", "stage": stage, "share": share})

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
            target = find(data, to)
            for kind, p in target["artifacts"].items():
                if not Path(p).exists():
                    raise RegistryError(f"cannot roll back to '{to}': its {kind} artefact is gone ({p})")
            set_stage(data, to, "production", None, reason=reason or f"rollback from {current}", rollback=True)
            data["events"][-1]["event"] = "rollback"
            return dict(find(data, to))


# --------------------------------------------------------------------------- what a run directory tells the registry
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
    tracked = root / "tracking" / "mlflow.json"
    if tracked.exists():  # the MLflow run that tracked the training (the mlflow back-end links to it)
        with _suppress():
            t = json.loads(tracked.read_text(encoding="utf-8"))
            out["metadata"]["mlflow_run_id"] = t.get("run_id")
            out["metadata"]["mlflow_tracking_uri"] = t.get("tracking_uri")
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
