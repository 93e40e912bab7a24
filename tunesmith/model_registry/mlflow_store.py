"""The ``mlflow`` registry back-end: versions in the MLflow Model Registry.

One tunesmith registry is one MLflow *registered model*; each tunesmith version is
one MLflow *model version*:

* the version's entry (name, stage, artefacts, metrics, config hash, base model,
  metadata, history) is the model-version tag ``tunesmith.entry`` (JSON), with
  readable copies for the MLflow UI (``tunesmith.version``, ``tunesmith.stage``,
  ``metric.<name>``); the model version's ``source`` is its first artefact and,
  when the run was tracked with the ``mlflow`` logger in the same store, its
  ``run_id`` links the training run;
* the ``production``, ``canary`` and ``staging`` pointers are MLflow **aliases**
  (``models:/NAME@production`` loads the production version in MLflow itself);
* the traffic shares, the production history (for rollback) and the event log are
  the registered-model tag ``tunesmith.state``.

The rules are :mod:`tunesmith.model_registry.state`'s, the same as the local
back-end's. Safety:

* version numbers come from MLflow, so parallel registrations never collide; an
  auto-named version is ``v<MLflow version number>``; an explicitly named version
  that two writers register at once is kept for the first (lower number) and the
  other is deleted again and reports "already registered";
* promotions, rollbacks and the shared state are read-modify-writes under a lock:
  a file lock beside the database when the store is a sqlite file
  (``<db>.tunesmith.lock``); against an ``mlflow server``, whose clients may be on
  other machines, the lock is a registered model ``<name>.tunesmith-lock`` that a
  writer creates (creation is atomic on the server: one writer wins) and deletes
  when it is done. A lock that stays unchanged for ``stale_after`` seconds (a
  writer that died holding it) is broken;
* a database file that is not an MLflow database, or a ``tunesmith.*`` tag that
  is not valid JSON, is reported and never written to.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sqlite3
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

from tunesmith.model_registry.state import (
    RegistryCorrupted,
    RegistryError,
    RegistryStore,
    add_event,
    check_state,
    empty_state,
    find,
    new_entry,
    set_stage,
)

ENTRY_TAG = "tunesmith.entry"
NAME_TAG = "tunesmith.version"
AUTO_TAG = "tunesmith.auto"
STATE_TAG = "tunesmith.state"
POINTERS = ("production", "canary", "staging")
#: MLflow's limit on a registry tag value is 100 000 characters; the event log is trimmed to stay below
_TAG_LIMIT = 90_000
_SQLITE_MAGIC = b"SQLite format 3\x00"
log = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path.db`` or
    ``sqlite:///relative.db``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(unquote(rest)) if rest else None


def check_sqlite(db: Path) -> None:
    """Refuse a file that is not an MLflow sqlite database (nothing is written to it)."""
    if not db.exists() or db.stat().st_size == 0:
        return
    with open(db, "rb") as fh:
        head = fh.read(16)
    if head != _SQLITE_MAGIC:
        raise RegistryCorrupted(f"{db}: not a sqlite database (corrupted MLflow store); left untouched",
                                hint="restore it from a backup or point the registry at another tracking_uri")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise RegistryCorrupted(f"{db}: unreadable sqlite database ({exc}); left untouched") from None
    if tables and not {"alembic_version", "registered_models", "model_versions"} <= tables:
        raise RegistryCorrupted(f"{db}: a sqlite database but not an MLflow store (tables: {', '.join(sorted(tables)[:6])}); "
                                "left untouched")


def prepare_mlflow() -> None:
    """Before mlflow is imported: no usage telemetry (tunesmith is offline by default)
    and no run links printed on stdout (they would corrupt ``--json`` output). A
    user's own setting of either variable wins."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def quiet_mlflow() -> None:
    """MLflow and alembic log every schema migration at INFO; keep the CLI's output clean."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_client(tracking_uri: str, registry_uri: str | None = None, *, lock_timeout: float = 300.0) -> Any:
    """An ``MlflowClient``; a new sqlite database is created (and migrated) under a
    file lock so that several processes starting at once do not race."""
    prepare_mlflow()
    from mlflow.tracking import MlflowClient

    quiet_mlflow()  # after the import: importing mlflow sets its loggers up

    db = sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    check_sqlite(db)
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    # the first connection creates (or migrates) the schema: one process at a time
    with FileLock(str(db) + ".init.lock", timeout=lock_timeout):
        client.search_registered_models(max_results=1)
    return client


class ServerLock:
    """A mutual-exclusion lock on an MLflow server: the registered model ``name``.

    ``create_registered_model`` is atomic on the server (a unique key in its
    database), so exactly one writer creates the lock model; the others see
    ``RESOURCE_ALREADY_EXISTS`` and wait. Releasing deletes it. A writer that died
    holding the lock would block everyone: a lock whose creation time stays the same
    for ``stale_after`` seconds of this client's own clock (no clock comparison
    between machines) is deleted and taken over.
    """

    def __init__(self, client: Any, name: str, *, timeout: float = 60.0, stale_after: float = 30.0,
                 poll: float = 0.05) -> None:
        self.client, self.name = client, name
        self.timeout, self.stale_after, self.poll = timeout, stale_after, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    def __enter__(self) -> "ServerLock":
        deadline = time.monotonic() + self.timeout
        seen: tuple[Any, float] | None = None  # (creation time of the lock we wait on, when we first saw it)
        delay = self.poll
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(self.name)
            try:
                self.client.create_registered_model(self.name, tags={"tunesmith.lock": self.owner},
                                                    description="tunesmith registry lock (transient)")
                return self
            except Exception as exc:  # noqa: BLE001
                if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                    # the server lost the insert to a holder, then looked the holder's lock up
                    # after it had been released: contended, try again
                    continue
                if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                    raise
            try:
                stamp = self.client.get_registered_model(self.name).creation_timestamp
            except Exception as exc:  # noqa: BLE001 - released meanwhile: try again at once
                if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                    continue
                raise
            now = time.monotonic()
            if seen is None or seen[0] != stamp:
                seen = (stamp, now)
            elif now - seen[1] > self.stale_after:
                log.warning("registry lock %s unchanged for %.0f s (a writer died holding it): breaking it",
                            self.name, now - seen[1])
                self._delete()
                seen = None
                continue
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def __exit__(self, *exc: object) -> None:
        self._delete()

    def _delete(self) -> None:
        try:
            self.client.delete_registered_model(self.name)
        except Exception as exc:  # noqa: BLE001 - broken by another writer after a stall
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise


def _is(exc: BaseException, code: str) -> bool:
    return getattr(exc, "error_code", None) == code or code in str(exc)


class MlflowRegistry(RegistryStore):
    """The versions of one registered model in an MLflow tracking/registry store."""

    def __init__(self, tracking_uri: str, model_name: str, *, registry_uri: str | None = None,
                 lock_timeout: float = 60.0, upload_artifacts: bool | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self.lock_timeout = lock_timeout
        self.db = sqlite_path(self.registry_uri)
        self.location = f"{self.registry_uri} (model '{model_name}')"
        self.root = self.db.parent if self.db else Path(".")
        #: copy the artefacts into MLflow's artefact store (default: for a server, whose
        #: clients may not share this machine's files; a sqlite store keeps local paths)
        self.upload = (self.db is None and not self.registry_uri.startswith("file:")) if upload_artifacts is None \
            else bool(upload_artifacts)
        self._client: Any = None

    # -- MLflow --------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = make_client(self.tracking_uri, self.registry_uri)
            except RegistryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store that cannot be opened
                raise RegistryError(f"cannot open the MLflow store {self.registry_uri}: {_last_line(exc)}") from None
        elif self.db is not None:
            check_sqlite(self.db)
        return self._client

    def _model_versions(self) -> list[Any]:
        out: list[Any] = []
        token = None
        while True:
            page = self.client.search_model_versions(f"name='{_quote(self.model_name)}'", max_results=1000,
                                                     page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                break
        return sorted(out, key=lambda mv: int(mv.version))

    def _registered_model(self) -> Any | None:
        try:
            return self.client.get_registered_model(self.model_name)
        except Exception as exc:  # noqa: BLE001
            if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise

    def _ensure_model(self) -> None:
        if self._registered_model() is not None:
            return
        try:
            self.client.create_registered_model(
                self.model_name, tags={"tunesmith": "1"},
                description="Model versions registered by tunesmith (stages in the aliases production/canary/staging).",
            )
        except Exception as exc:  # noqa: BLE001 - another writer created it first
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise

    # -- names ---------------------------------------------------------------
    @staticmethod
    def _assign_names(mvs: list[Any]) -> dict[int, str | None]:
        """MLflow version number -> tunesmith version name (None: a losing duplicate).

        Walks the versions in number order: an explicit name is taken by the first
        version that claims it; an auto-named version is ``v<number>`` (``.1``, ``.2``
        appended if an earlier version holds that name). A version's name depends only
        on versions created before it, so every reader computes the same names.
        """
        taken: set[str] = set()
        out: dict[int, str | None] = {}
        for mv in mvs:
            n = int(mv.version)
            tags = mv.tags or {}
            if tags.get(AUTO_TAG) == "1":
                name, k = f"v{n}", 0
                while name in taken:
                    k += 1
                    name = f"v{n}.{k}"
            elif tags.get(NAME_TAG):
                name = tags[NAME_TAG]
                if name in taken:
                    out[n] = None
                    continue
            else:  # a model version tunesmith did not register: not one of ours
                out[n] = None
                continue
            taken.add(name)
            out[n] = name
        return out

    # -- storage -------------------------------------------------------------
    def _read_full(self) -> tuple[dict, dict[str, int]]:
        rm = self._registered_model()
        if rm is None:
            return empty_state(), {}
        where = f"{self.registry_uri}: registered model '{self.model_name}'"
        raw = (rm.tags or {}).get(STATE_TAG)
        data = empty_state()
        if raw:
            try:
                saved = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RegistryCorrupted(f"{where}: corrupted registry (tag {STATE_TAG} is not JSON: {exc.msg} at "
                                        f"line {exc.lineno}, column {exc.colno}); left untouched",
                                        hint="fix or delete the tag in the MLflow UI") from None
            if not isinstance(saved, dict):
                raise RegistryCorrupted(f"{where}: tag {STATE_TAG} is not a tunesmith registry state; left untouched")
            for key in ("shares", "production_history", "events", "format"):
                if key in saved:
                    data[key] = saved[key]
        mvs = self._model_versions()
        names = self._assign_names(mvs)
        numbers: dict[str, int] = {}
        for mv in mvs:
            n = int(mv.version)
            raw_entry = (mv.tags or {}).get(ENTRY_TAG)
            if names.get(n) is None or not raw_entry:
                continue  # not ours, a losing duplicate, or a registration still being written
            try:
                entry = json.loads(raw_entry)
            except json.JSONDecodeError as exc:
                raise RegistryCorrupted(f"{where}: corrupted registry (version {n}: tag {ENTRY_TAG} is not JSON: "
                                        f"{exc.msg}); left untouched") from None
            if not isinstance(entry, dict):
                raise RegistryCorrupted(f"{where}: version {n}: tag {ENTRY_TAG} is not a version entry; left untouched")
            entry["version"] = names[n]
            data["versions"].append(entry)
            numbers[names[n]] = n
        by_number = {n: name for name, n in numbers.items()}
        aliases = dict(getattr(rm, "aliases", {}) or {})
        for pointer in POINTERS:
            num = aliases.get(pointer)
            data[pointer] = by_number.get(int(num)) if num is not None else None
        data = check_state(data, where)
        return data, numbers

    def _read(self) -> dict:
        return self._read_full()[0]

    def _lock(self) -> Any:
        if self.db is None:
            return ServerLock(self.client, f"{self.model_name}.tunesmith-lock", timeout=self.lock_timeout)
        from filelock import FileLock

        return FileLock(str(self.db) + ".tunesmith.lock", timeout=self.lock_timeout)

    @contextmanager
    def _edit(self) -> Iterator[dict]:
        from filelock import Timeout

        self.client  # connect (and create the database) before taking the lock
        where = f"{self.db}.tunesmith.lock" if self.db is not None else \
            f"{self.registry_uri}: registered model '{self.model_name}.tunesmith-lock'"
        try:
            with self._lock():
                data, numbers = self._read_full()
                before = copy.deepcopy(data)
                yield data
                self._write(before, data, numbers)
        except (Timeout, TimeoutError):
            raise RegistryError(f"{where}: could not take the registry lock in {self.lock_timeout:g} s") from None

    def _write(self, before: dict, after: dict, numbers: dict[str, int]) -> None:
        """Write what changed: entries first, then the aliases, then the shared state."""
        client = self.client
        old = {v["version"]: v for v in before["versions"]}
        for entry in after["versions"]:
            if entry != old.get(entry["version"]):
                n = str(numbers[entry["version"]])
                client.set_model_version_tag(self.model_name, n, ENTRY_TAG, _dumps(entry))
                client.set_model_version_tag(self.model_name, n, "tunesmith.stage", entry["stage"])
        for pointer in POINTERS:
            if after.get(pointer) == before.get(pointer):
                continue
            if after.get(pointer):
                client.set_registered_model_alias(self.model_name, pointer, str(numbers[after[pointer]]))
            else:
                try:
                    client.delete_registered_model_alias(self.model_name, pointer)
                except Exception as exc:  # noqa: BLE001 - already gone
                    if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                        raise
        keys = ("format", "shares", "production_history", "events")
        if any(after.get(k) != before.get(k) for k in keys) or not self._has_state_tag():
            state = {k: after.get(k) for k in keys}
            text = _dumps(state)
            while len(text) > _TAG_LIMIT and state["events"]:
                state["events"] = state["events"][len(state["events"]) // 4 + 1:]
                text = _dumps(state)
            client.set_registered_model_tag(self.model_name, STATE_TAG, text)

    def _has_state_tag(self) -> bool:
        rm = self._registered_model()
        return rm is not None and STATE_TAG in (rm.tags or {})

    def _insert(self, arts: dict[str, str], version: str | None, fields: dict, stage: str) -> dict:
        data, _ = self._read_full()  # also refuses a corrupted store before anything is written
        if version is not None and any(v["version"] == version for v in data["versions"]):
            raise RegistryError(f"version '{version}' is already registered")
        self._ensure_model()
        client = self.client
        tags = {AUTO_TAG: "1"} if version is None else {NAME_TAG: version}
        run_id = self._linked_run(fields.get("metadata") or {})
        first_kind, source = next(iter(arts.items()))
        if self.upload:
            # a server refuses local paths as sources (and other machines could not read
            # them): the artefacts go to the MLflow artefact store, the source is runs:/
            run_id = run_id or self._registration_run(fields)
            for kind, path in arts.items():
                p = Path(path)
                if p.is_dir():
                    client.log_artifacts(run_id, str(p), artifact_path=f"registry/{kind}")
                else:
                    client.log_artifact(run_id, str(p), artifact_path=f"registry/{kind}")
            first = Path(source)
            source = f"runs:/{run_id}/registry/{first_kind}" + ("" if first.is_dir() else f"/{first.name}")
        mv = client.create_model_version(
            self.model_name, source=source, run_id=run_id, tags=tags,
            description=f"tunesmith: {', '.join(f'{k} {p}' for k, p in arts.items())}",
        )
        number = int(mv.version)
        names = self._assign_names(self._model_versions())
        name = names.get(number)
        if name is None:  # another writer registered this name first
            client.delete_model_version(self.model_name, str(number))
            raise RegistryError(f"version '{version}' is already registered")
        entry = new_entry(name, arts, **fields)
        entry["mlflow"] = {"model": self.model_name, "version": number, "source": source, "run_id": run_id}
        readable = {NAME_TAG: name, "tunesmith.stage": "registered"}
        for k, v in list(entry["metrics"].items())[:50]:
            readable[f"metric.{k}"] = str(v)
        if entry.get("base_model"):
            readable["tunesmith.base_model"] = str(entry["base_model"])[:5000]
        for k, v in readable.items():
            client.set_model_version_tag(self.model_name, str(number), k, v)
        client.set_model_version_tag(self.model_name, str(number), ENTRY_TAG, _dumps(entry))  # last: the version is complete
        with self._edit() as state:
            add_event(state, {"event": "register", "version": name})
            if stage != "registered":
                set_stage(state, name, stage, None)
            return dict(find(state, name))

    def _registration_run(self, fields: dict) -> str:
        """A run in the experiment ``tunesmith-registry`` that holds a registration's
        artefacts and metrics (when the training was not tracked in this store)."""
        from mlflow.entities import Metric, Param

        client = self.client
        exp = client.get_experiment_by_name("tunesmith-registry")
        if exp is None:
            try:
                exp_id = client.create_experiment("tunesmith-registry")
            except Exception:  # noqa: BLE001 - created meanwhile
                exp_id = client.get_experiment_by_name("tunesmith-registry").experiment_id
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=f"register {self.model_name}",
                                tags={"tunesmith.registered_model": self.model_name})
        import time

        ts = int(time.time() * 1000)
        metrics = [Metric(str(k)[:250], float(v), ts, 0) for k, v in (fields.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        params = [Param(k, str(fields[k])[:6000]) for k in ("config_hash", "base_model") if fields.get(k)]
        if metrics or params:
            client.log_batch(run.info.run_id, metrics=metrics[:1000], params=params, synchronous=True)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    def _linked_run(self, metadata: dict) -> str | None:
        """The MLflow run that tracked the training, when it lives in this store."""
        run_id, uri = metadata.get("mlflow_run_id"), metadata.get("mlflow_tracking_uri")
        if not run_id or not uri or _norm_uri(uri) != _norm_uri(self.tracking_uri):
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted or elsewhere: register without the link
            return None
        return run_id


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)


def _norm_uri(uri: str) -> str:
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri.rstrip("/")


def _last_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def default_tracking_uri(location: Path) -> str:
    """``sqlite:///<registry folder>/mlflow.db``."""
    return f"sqlite:///{(Path(location).expanduser().resolve() / 'mlflow.db')}"


def env_tracking_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or None
