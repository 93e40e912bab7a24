"""The plugin manager: entry points in, registries out.

Entry points of the group ``tunesmith`` are loaded one by one; a plugin that fails
to import, to pass pluggy's checks or to register is recorded with its
distribution and the error's last line and skipped (``strict=True`` raises
instead), so one broken package never takes the command line down.

Environment switches:

* ``TUNESMITH_DISABLE_PLUGINS=a,b`` blocks entry points by name (like
  ``plugins.disable`` in a config or ``--disable`` on the command line);
* ``TUNESMITH_LOAD_PLUGINS=a,b`` loads only these entry points; set it to the
  empty string to load none (hermetic tests).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import threading
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator

import pluggy

from tunesmith._markers import PROJECT
from tunesmith.core.errors import PluginError
from tunesmith.core.registry import AREAS, Entry, PluginInfo, Registries

ENTRY_POINT_GROUP = PROJECT
ENV_DISABLE = "TUNESMITH_DISABLE_PLUGINS"
ENV_ALLOW = "TUNESMITH_LOAD_PLUGINS"

_lock = threading.RLock()
_cache: dict[tuple, tuple[pluggy.PluginManager, Registries]] = {}
#: extra plugin objects registered in-process (tests, notebooks): name -> module/object
_extra: dict[str, Any] = {}
#: the registries of the run in progress (innermost last), see activate()
_active: list[Registries] = []


def _last_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [x.strip() for x in raw.split(",") if x.strip()]


def new_plugin_manager() -> pluggy.PluginManager:
    from tunesmith import hookspecs

    pm = pluggy.PluginManager(PROJECT)
    for mod in hookspecs.SPEC_MODULES:
        pm.add_hookspecs(mod)
    return pm


def _spec_names(pm: pluggy.PluginManager) -> set[str]:
    return {name for name in dir(pm.hook) if not name.startswith("_") and getattr(pm.hook, name).spec is not None}


def _check_plugin(pm: pluggy.PluginManager, plugin: Any, info: PluginInfo) -> str | None:
    """Hook implementations that match no spec: a misspelt hook fails loudly."""
    specs = _spec_names(pm)
    hooks = []
    for attr in dir(plugin):
        try:
            opts = pm.parse_hookimpl_opts(plugin, attr)
        except Exception:  # noqa: BLE001 - odd attributes on odd modules
            opts = None
        if opts is None:
            continue
        hook_name = opts.get("specname") or attr
        if hook_name not in specs:
            close = difflib.get_close_matches(hook_name, sorted(specs), n=1)
            return f"unknown hook '{hook_name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        hooks.append(hook_name)
    info.hooks = sorted(hooks)
    return None


def _register(pm: pluggy.PluginManager, plugin: Any, info: PluginInfo, regs: Registries, strict: bool) -> bool:
    try:
        problem = _check_plugin(pm, plugin, info)
        if problem:
            raise PluginError(problem)
        pm.register(plugin, name=info.name)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the host down
        _fail(info, exc, regs, strict)
        return False
    regs.plugins[info.name] = info
    return True


def _fail(info: PluginInfo, exc: BaseException, regs: Registries, strict: bool) -> None:
    info.status = "failed"
    info.error = _last_line(exc)
    regs.plugins[info.name] = info
    regs.failures.append(info)
    if strict:
        raise PluginError(
            f"plugin '{info.name}' from '{info.distribution}' {info.version} failed: {info.error}",
            hint="run without --strict to skip it",
        ) from exc


def iter_entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str]] = set()
    out = []
    for ep in eps:
        key = (ep.name, ep.value)
        if key in seen:  # a package installed twice on sys.path
            continue
        seen.add(key)
        out.append(ep)
    return sorted(out, key=lambda e: e.name)


def _ep_info(ep: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    return PluginInfo(
        name=ep.name,
        distribution=(dist.metadata["Name"] if dist is not None else "unknown"),
        version=(dist.version if dist is not None else "unknown"),
        value=ep.value,
    )


def load_plugins(
    *,
    disable: Iterable[str] = (),
    strict: bool = False,
    entry_points: bool = True,
    only: Callable[[PluginInfo], bool] | None = None,
) -> tuple[pluggy.PluginManager, Registries]:
    """Load every entry point (minus the disabled ones) into a fresh plugin manager."""
    pm = new_plugin_manager()
    regs = Registries()
    regs.hook = pm.hook
    blocked = set(disable) | set(_env_list(ENV_DISABLE) or [])
    allow = _env_list(ENV_ALLOW)
    if entry_points:
        for ep in iter_entry_points():
            info = _ep_info(ep)
            if only is not None and not only(info):
                continue
            if ep.name in blocked or (allow is not None and ep.name not in allow):
                pm.set_blocked(ep.name)
                info.status = "disabled"
                regs.plugins[ep.name] = info
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001
                _fail(info, exc, regs, strict)
                continue
            _register(pm, plugin, info, regs, strict)
    for name, plugin in list(_extra.items()):
        info = PluginInfo(name=name, distribution=getattr(plugin, "__distribution__", "(in-process)"), version="-")
        if name in blocked:
            info.status = "disabled"
            regs.plugins[name] = info
            continue
        _register(pm, plugin, info, regs, strict)
    unknown = blocked - set(regs.plugins)
    for name in sorted(unknown):
        regs.warnings.append(f"cannot disable '{name}': no plugin has that entry-point name")
    return pm, regs


def build_registries(pm: pluggy.PluginManager, regs: Registries, *, strict: bool = False) -> Registries:
    """Call every ``register_*`` hook plugin by plugin, stamping each object with its source.

    A plugin whose registration raises in any area contributes nothing at all.
    """
    collected: list[Entry] = []
    for area in AREAS.values():
        caller = getattr(pm.hook, area.hook)
        for impl in caller.get_hookimpls():
            info = regs.plugins.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "unknown", "unknown")
            if info.status == "failed":
                continue
            added: list[Entry] = []

            def register(obj: Any, replaces: str | None = None, *, _info=info, _added=added, _area=area) -> None:
                problem = regs.validate_object(_area, obj)
                if problem:
                    raise PluginError(problem)
                _added.append(Entry(area=_area.key, name=obj.name, obj=obj, plugin=_info, replaces=replaces))

            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001
                _fail(info, exc, regs, strict)
                continue
            collected.extend(added)
    failed = {f.name for f in regs.failures}
    for name in failed:
        if pm.has_plugin(name):
            pm.unregister(name=name)
    for e in collected:
        if e.plugin.name not in failed:
            regs.areas[e.area]._add(e)
    for registry in regs.areas.values():
        registry._resolve()
        regs.warnings.extend(registry.warnings)
        if strict and registry.conflicts:
            raise PluginError(registry.conflict_message(next(iter(registry.conflicts))))
    return regs


def get_plugin_manager(*, disable: tuple[str, ...] = (), strict: bool = False) -> pluggy.PluginManager:
    return _get(disable, strict)[0]


def get_registries(*, disable: tuple[str, ...] | None = None, strict: bool | None = None) -> Registries:
    """The registries of the installed plugins (cached).

    With no arguments: those of the run in progress when one is active (see
    :func:`activate`: a config's ``plugins.disable`` / ``strict`` then hold in every
    helper that looks the registries up itself), else every plugin.
    """
    if disable is None and strict is None and _active:
        return _active[-1]
    return _get(tuple(disable or ()), bool(strict))[1]


def registries_for(cfg: Any = None, registries: Any = None) -> Registries:
    """``registries`` when given, else those a config runs with (its ``plugins.disable``
    and ``plugins.strict`` honoured), else :func:`get_registries`."""
    if registries is not None:
        return registries
    if cfg is not None and getattr(cfg, "plugins", None) is not None:
        return get_registries(disable=tuple(cfg.plugins.disable), strict=cfg.plugins.strict)
    return get_registries()


@contextlib.contextmanager
def activate(registries: Registries) -> Iterator[Registries]:
    """Make ``registries`` what :func:`get_registries` returns (no arguments) inside the
    block: one run's plugin choice holds everywhere in it."""
    with _lock:
        _active.append(registries)
    try:
        yield registries
    finally:
        with _lock:
            if _active and _active[-1] is registries:
                _active.pop()
            elif registries in _active:
                _active.remove(registries)


def _get(disable: tuple[str, ...], strict: bool) -> tuple[pluggy.PluginManager, Registries]:
    key = (tuple(sorted(disable)), strict, os.environ.get(ENV_DISABLE), os.environ.get(ENV_ALLOW), tuple(_extra))
    with _lock:
        if key not in _cache:
            pm, regs = load_plugins(disable=disable, strict=strict)
            build_registries(pm, regs, strict=strict)
            _cache[key] = (pm, regs)
        return _cache[key]


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register an in-process plugin (a module or object with hookimpls); returns its name."""
    name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
    with _lock:
        _extra[name] = plugin
        _cache.clear()
    return name


def unregister_plugin(name: str) -> None:
    with _lock:
        _extra.pop(name, None)
        _cache.clear()


def reset() -> None:
    with _lock:
        _cache.clear()
        _active.clear()
