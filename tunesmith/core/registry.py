"""Registries: one per plugin area, filled through the ``register_*`` hooks.

Rules (DESIGN.md):

* a name is unique per area; a plugin takes over a name only by saying so,
  ``register(obj, replaces="lora")``;
* two plugins claiming one name (or both replacing it) is a conflict: the name is
  unusable, and the error names both distributions. Load order between plugins is
  undefined, so no rule here depends on it;
* every entry records the plugin (entry-point name), distribution and version that
  registered it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from tunesmith.core.errors import PluginError, PluginNotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@dataclass(frozen=True)
class Area:
    """One plugin area: its hook, the noun users see, and the Protocol in
    :mod:`tunesmith.hookspecs` that says what an object must (and may) provide."""

    key: str
    hook: str
    noun: str
    protocol: str  # "module:Class" under tunesmith.hookspecs

    @property
    def spec(self) -> type:
        import importlib

        mod, cls = self.protocol.split(":")
        return getattr(importlib.import_module(f"tunesmith.hookspecs.{mod}"), cls)

    @property
    def required(self) -> tuple[str, ...]:
        """Members every object must have (besides ``name`` and ``description``)."""
        return protocol_members(self.spec)[0]

    @property
    def optional(self) -> dict[str, Any]:
        """Optional members and the default core uses when an object lacks one."""
        return protocol_members(self.spec)[1]


def protocol_members(proto: type) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``(required, {optional: default})`` of an area Protocol.

    A Protocol lists its members as annotations (attributes) and methods; those
    named in its ``OPTIONAL`` tuple are optional, with the class attribute's value
    as the default (``None`` for an optional method: core skips the call).
    """
    optional_names = set(getattr(proto, "OPTIONAL", ()))
    names: list[str] = []
    for klass in reversed(proto.__mro__):
        if klass in (object,) or klass.__module__ in ("typing", "typing_extensions", "abc"):
            continue
        for n in getattr(klass, "__annotations__", {}):
            if n != "OPTIONAL" and n not in names:
                names.append(n)
        for n, v in vars(klass).items():
            if callable(v) and not n.startswith("_") and n not in names:
                names.append(n)
    required = tuple(n for n in names if n not in optional_names and n not in ("name", "description"))
    optional: dict[str, Any] = {}
    for n in names:
        if n in optional_names:
            v = getattr(proto, n, None)
            optional[n] = None if callable(v) and not isinstance(v, type) else v
    return required, optional


def member(obj: Any, area: str, name: str) -> Any:
    """An optional member of a plugin object, or its area Protocol's default
    (``area`` is the area key, e.g. ``"peft_methods"``). Asking for a name the
    Protocol does not declare is an error: every member core reads is declared."""
    opt = AREAS[area].optional
    if name not in opt and name not in AREAS[area].required:
        raise AttributeError(f"'{name}' is not declared by the {AREAS[area].noun} protocol ({AREAS[area].protocol})")
    return getattr(obj, name, opt.get(name))


AREAS: dict[str, Area] = {
    a.key: a
    for a in (
        Area("model_sources", "register_model_sources", "model source", "models:ModelSource"),
        Area("peft_methods", "register_peft_methods", "PEFT method", "models:PeftMethod"),
        Area("chat_templates", "register_chat_templates", "chat template", "templates:ChatTemplate"),
        Area("data_formats", "register_data_formats", "data format", "data:DataFormat"),
        Area("cleaners", "register_cleaners", "cleaner", "data:Cleaner"),
        Area("generators", "register_generators", "generator", "data:Generator"),
        Area("objectives", "register_objectives", "objective", "objectives:Objective"),
        Area("losses", "register_losses", "loss", "training:Loss"),
        Area("reward_functions", "register_reward_functions", "reward function", "training:RewardFunction"),
        Area("loggers", "register_loggers", "logger", "tracking:Logger"),
        Area("evaluators", "register_evaluators", "evaluator", "evaluation:Evaluator"),
        Area("exporters", "register_exporters", "exporter", "export:Exporter"),
        Area("registry_backends", "register_registry_backends", "registry back-end", "tracking:RegistryBackend"),
        Area("serving_engines", "register_serving_engines", "serving engine", "serving:ServingEngine"),
    )
}


@dataclass
class PluginInfo:
    """Where a plugin came from."""

    name: str  # entry-point name (what plugins.disable takes)
    distribution: str
    version: str
    value: str = ""  # "module:attr" of the entry point
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None
    hooks: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One registered object."""

    area: str
    name: str
    obj: Any
    plugin: PluginInfo
    replaces: str | None = None
    status: str = "active"  # active | replaced | conflict
    replaced_by: "Entry | None" = None
    note: str | None = None

    @property
    def description(self) -> str:
        return str(getattr(self.obj, "description", "") or "")

    def as_dict(self) -> dict:
        d = {
            "area": self.area,
            "name": self.name,
            "description": self.description,
            "plugin": self.plugin.name,
            "distribution": self.plugin.distribution,
            "version": self.plugin.version,
            "status": self.status,
        }
        if self.replaces:
            d["replaces"] = self.replaces
        if self.replaced_by is not None:
            d["replaced_by"] = f"{self.replaced_by.plugin.distribution} ({self.replaced_by.plugin.name})"
        if self.note:
            d["note"] = self.note
        return d


def _describe(entry: Entry) -> str:
    return f"'{entry.plugin.distribution}' (entry point {entry.plugin.name})"


class Registry:
    """The objects of one area, by name."""

    def __init__(self, area: Area) -> None:
        self.area = area
        self._claims: dict[str, list[Entry]] = {}
        self._resolved: dict[str, Entry] = {}
        self._conflicts: dict[str, list[Entry]] = {}
        self.warnings: list[str] = []

    # -- filling ---------------------------------------------------------
    def _add(self, entry: Entry) -> None:
        self._claims.setdefault(entry.name, []).append(entry)

    def _resolve(self) -> None:
        """Settle replacements and conflicts once every plugin has registered."""
        entries = [e for claims in self._claims.values() for e in claims]
        by_name: dict[str, list[Entry]] = {}
        for e in entries:
            by_name.setdefault(e.name, []).append(e)
        replacers: dict[str, list[Entry]] = {}
        for e in entries:
            if e.replaces:
                replacers.setdefault(e.replaces, []).append(e)
        names = set(by_name) | set(replacers)
        for name in sorted(names):
            reps = replacers.get(name, [])
            own = [e for e in by_name.get(name, []) if e.replaces != name]
            if len(reps) > 1:
                self._conflict(name, reps, "both replace it")
                for e in own:
                    e.status = "conflict"
                continue
            if len(reps) == 1:
                winner = reps[0]
                if not own:
                    self.warnings.append(
                        f"{_describe(winner)} replaces the {self.area.noun} '{name}', which no plugin registers"
                    )
                    if winner.name != name:
                        continue
                for e in own:
                    e.status = "replaced"
                    e.replaced_by = winner
                self._resolved[name] = winner
                continue
            if len(own) > 1:
                self._conflict(name, own, "both register it")
                continue
            if own:
                self._resolved[name] = own[0]
        # an object registered under its own name while replacing another stays
        # reachable under its own name too
        for e in entries:
            if e.replaces and e.name != e.replaces and e.name not in self._resolved and e.name not in self._conflicts:
                self._resolved[e.name] = e

    def _conflict(self, name: str, entries: list[Entry], why: str) -> None:
        for e in entries:
            e.status = "conflict"
            e.note = f"name '{name}' also claimed by " + ", ".join(_describe(o) for o in entries if o is not e)
        self._conflicts[name] = entries

    # -- reading ---------------------------------------------------------
    def conflict_message(self, name: str) -> str:
        entries = self._conflicts[name]
        who = " and ".join(_describe(e) for e in entries)
        return (
            f"two plugins claim the {self.area.noun} '{name}': {who}. "
            f"Disable one (plugins.disable / --disable ENTRY_POINT) or have one register it with replaces='{name}'"
        )

    def get(self, name: str) -> Any:
        """The object registered under ``name``; a clear error otherwise."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        if name in self._conflicts:
            raise PluginError(self.conflict_message(name))
        try:
            return self._resolved[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._resolved), n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                "available: " + ", ".join(sorted(self._resolved)) if self._resolved else "no plugin registers any"
            )
            raise PluginNotFound(f"unknown {self.area.noun} '{name}'", hint=hint) from None

    def names(self) -> list[str]:
        return sorted(self._resolved)

    def entries(self) -> list[Entry]:
        """Every registration, including replaced and conflicting ones."""
        return sorted((e for c in self._claims.values() for e in c), key=lambda e: (e.name, e.plugin.name))

    @property
    def conflicts(self) -> dict[str, list[Entry]]:
        return dict(self._conflicts)

    def __contains__(self, name: object) -> bool:
        return name in self._resolved

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._resolved)

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._resolved[n].obj) for n in self.names()]

    def __repr__(self) -> str:
        return f"<Registry {self.area.key}: {', '.join(self.names()) or 'empty'}>"


class Registries:
    """All areas' registries plus what happened while loading plugins."""

    def __init__(self) -> None:
        self.areas: dict[str, Registry] = {k: Registry(a) for k, a in AREAS.items()}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginInfo] = []
        self.warnings: list[str] = []
        self.hook: Any = None  # pluggy HookRelay, for lifecycle events

    def __getattr__(self, name: str) -> Registry:
        areas = self.__dict__.get("areas", {})
        if name in areas:
            return areas[name]
        raise AttributeError(name)

    def __getitem__(self, area: str) -> Registry:
        try:
            return self.areas[area]
        except KeyError:
            raise KeyError(f"unknown plugin area '{area}'; areas: {', '.join(self.areas)}") from None

    def entries(self) -> list[Entry]:
        return [e for r in self.areas.values() for e in r.entries()]

    def as_dict(self) -> dict:
        return {
            "areas": {k: [e.as_dict() for e in r.entries()] for k, r in self.areas.items()},
            "plugins": [
                {
                    "name": p.name,
                    "distribution": p.distribution,
                    "version": p.version,
                    "entry_point": p.value,
                    "status": p.status,
                    "hooks": p.hooks,
                    **({"error": p.error} if p.error else {}),
                }
                for p in sorted(self.plugins.values(), key=lambda p: p.name)
            ],
            "failures": [
                {"name": f.name, "distribution": f.distribution, "version": f.version, "entry_point": f.value, "error": f.error}
                for f in self.failures
            ],
            "warnings": list(self.warnings),
        }

    def validate_object(self, area: Area, obj: Any) -> str | None:
        """Why ``obj`` cannot be registered in ``area``, or None."""
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            return f"{area.noun} {obj!r} has no valid 'name' (lower-case letters, digits, '_', '-', '.')"
        if not isinstance(getattr(obj, "description", None), str):
            return f"{area.noun} '{name}' has no 'description' string"
        missing = [m for m in area.required if not hasattr(obj, m)]
        if missing:
            return f"{area.noun} '{name}' lacks {', '.join(missing)} (see the {area.protocol.split(':')[1]} protocol in docs/plugins.md)"
        opts = getattr(obj, "Options", None)
        if opts is not None:
            from pydantic import BaseModel

            if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
                return f"{area.noun} '{name}': Options must be a pydantic BaseModel subclass"
        return None
