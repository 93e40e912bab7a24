"""Plugin discovery, registries and their rules (DESIGN.md: the hook contract)."""

from __future__ import annotations

import pytest

import tunesmith
from tunesmith.core import plugins
from tunesmith.core.errors import PluginError, PluginNotFound
from tunesmith.core.registry import AREAS

CLEANER_PLUGIN = """
from tunesmith import hookimpl

class Shout:
    name = "{name}"
    description = "upper-cases text"
    def apply(self, records, options, context):
        yield from records

@hookimpl
def register_cleaners(register):
    register(Shout(){replaces})
"""


def cleaner_module(name: str, replaces: str | None = None) -> str:
    return CLEANER_PLUGIN.format(name=name, replaces=f", replaces={replaces!r}" if replaces else "")


BUILT_IN = {
    "model_sources": "default", "peft_methods": "lora", "data_formats": "alpaca", "cleaners": "normalize",
    "objectives": "sft", "losses": "causal_lm", "reward_functions": "regex", "evaluators": "perplexity",
    "exporters": "merged", "generators": "local",
}


@pytest.mark.parametrize("area,name", sorted(BUILT_IN.items()))
def test_builtins_come_from_entry_points(area, name):
    regs = tunesmith.registry()
    entry = regs[area].entry(name)
    assert entry.plugin.distribution == "tunesmith" and entry.plugin.version == tunesmith.__version__
    ep = {e.name: e for e in plugins.iter_entry_points()}[entry.plugin.name]
    assert ep.value.startswith("tunesmith.plugins."), ep.value  # through the same entry points a third party uses


def test_every_registry_empty_when_every_entry_point_blocked(monkeypatch):
    names = [ep.name for ep in plugins.iter_entry_points()]
    assert names, "the built-ins must be entry points"
    regs = tunesmith.registry(disable=tuple(names))
    for area in AREAS:
        assert len(regs[area]) == 0, area
    assert all(p.status == "disabled" for p in regs.plugins.values())


def test_allow_list_env_loads_nothing(monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "")
    plugins.reset()
    regs = tunesmith.registry()
    assert all(len(regs[a]) == 0 for a in AREAS)


def test_importing_core_loads_no_plugin_module():
    """At run time too (the source-level scan is tests/core/test_layering.py)."""
    import subprocess
    import sys

    code = (
        "import sys, tunesmith, tunesmith.core.config, tunesmith.core.plugins, tunesmith.core.registry, "
        "tunesmith.core.session, tunesmith.core.training, tunesmith.cli;"
        "print([m for m in sys.modules if m.startswith('tunesmith.plugins')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_third_party_plugin_is_listed_with_its_distribution(fake_dists):
    fake_dists("acme-clean", {"acme_clean": cleaner_module("shout")}, {"acme.shout": "acme_clean"}, version="2.3")
    regs = tunesmith.registry()
    entry = regs.cleaners.entry("shout")
    assert entry.plugin.distribution == "acme-clean"
    assert entry.plugin.version == "2.3"
    assert regs.cleaners.get("shout").description == "upper-cases text"


def test_two_plugins_claiming_one_name_is_an_error_naming_both(fake_dists):
    fake_dists("acme-a", {"acme_a": cleaner_module("shout")}, {"acme.a": "acme_a"})
    fake_dists("acme-b", {"acme_b": cleaner_module("shout")}, {"acme.b": "acme_b"})
    regs = tunesmith.registry()
    with pytest.raises(PluginError) as err:
        regs.cleaners.get("shout")
    assert "'acme-a'" in str(err.value) and "'acme-b'" in str(err.value)
    statuses = {e.plugin.distribution: e.status for e in regs.cleaners.entries() if e.name == "shout"}
    assert statuses == {"acme-a": "conflict", "acme-b": "conflict"}
    with pytest.raises(PluginError, match="acme-a"):
        tunesmith.registry(strict=True)


def test_explicit_replacement_wins_and_shows(fake_dists):
    fake_dists("acme-base", {"acme_base": cleaner_module("shout")}, {"acme.base": "acme_base"})
    fake_dists("acme-better", {"acme_better": cleaner_module("shout2", replaces="shout")}, {"acme.better": "acme_better"})
    regs = tunesmith.registry()
    assert regs.cleaners.entry("shout").plugin.distribution == "acme-better"
    assert regs.cleaners.entry("shout2").plugin.distribution == "acme-better"
    replaced = [e for e in regs.cleaners.entries() if e.plugin.distribution == "acme-base"][0]
    assert replaced.status == "replaced"
    assert "acme-better" in replaced.as_dict()["replaced_by"]


def test_broken_plugin_is_reported_and_skipped(fake_dists):
    fake_dists("acme-broken", {"acme_broken": "import does_not_exist_anywhere\n"}, {"acme.broken": "acme_broken"})
    fake_dists("acme-ok", {"acme_ok": cleaner_module("shout")}, {"acme.ok": "acme_ok"})
    regs = tunesmith.registry()
    failure = [f for f in regs.failures if f.name == "acme.broken"][0]
    assert failure.distribution == "acme-broken"
    assert "does_not_exist_anywhere" in failure.error
    assert "shout" in regs.cleaners
    with pytest.raises(PluginError, match="acme.broken.*acme-broken.*does_not_exist_anywhere"):
        tunesmith.registry(strict=True)


def test_misspelt_hook_fails_loudly(fake_dists):
    code = "from tunesmith import hookimpl\n@hookimpl\ndef register_cleanerz(register):\n    pass\n"
    fake_dists("acme-typo", {"acme_typo": code}, {"acme.typo": "acme_typo"})
    regs = tunesmith.registry()
    failure = [f for f in regs.failures if f.name == "acme.typo"][0]
    assert "register_cleanerz" in failure.error and "register_cleaners" in failure.error


def test_invalid_object_is_rejected(fake_dists):
    code = (
        "from tunesmith import hookimpl\n"
        "class NoApply:\n    name='x'\n    description='d'\n"
        "@hookimpl\ndef register_cleaners(register):\n    register(NoApply())\n"
    )
    fake_dists("acme-bad", {"acme_bad": code}, {"acme.bad": "acme_bad"})
    regs = tunesmith.registry()
    failure = [f for f in regs.failures if f.name == "acme.bad"][0]
    assert "lacks apply (see the Cleaner protocol" in failure.error
    assert "x" not in regs.cleaners


def test_plugin_failing_in_one_area_contributes_nothing(fake_dists):
    code = cleaner_module("shout") + (
        "\n@hookimpl\ndef register_evaluators(register):\n    raise RuntimeError('boom')\n"
    )
    fake_dists("acme-half", {"acme_half": code}, {"acme.half": "acme_half"})
    regs = tunesmith.registry()
    assert "shout" not in regs.cleaners
    assert any(f.name == "acme.half" and "boom" in f.error for f in regs.failures)


def test_disable_by_entry_point_name(fake_dists):
    fake_dists("acme-clean", {"acme_clean": cleaner_module("shout")}, {"acme.shout": "acme_clean"})
    regs = tunesmith.registry(disable=("acme.shout",))
    assert "shout" not in regs.cleaners
    assert regs.plugins["acme.shout"].status == "disabled"


def test_unknown_name_suggests_the_nearest(tunesmith_plugin):
    class Mod:
        class Shout:
            name = "shout"
            description = "d"

            def apply(self, records, options, context):
                return records

        @staticmethod
        @tunesmith.hookimpl
        def register_cleaners(register):
            register(Mod.Shout())

    tunesmith_plugin(Mod, "in-process")
    with pytest.raises(PluginNotFound, match="did you mean 'shout'"):
        tunesmith.registry().cleaners.get("shuot")


def test_lifecycle_hooks_reach_plugins(tunesmith_plugin):
    from tunesmith.core.context import RunContext

    seen = []

    class Listener:
        @staticmethod
        @tunesmith.hookimpl
        def after_step(run, step, logs):
            seen.append((step, logs["loss"]))
            return step >= 2

    tunesmith_plugin(Listener, "listener")
    run = RunContext(registries=tunesmith.registry())
    assert run.emit("after_step", step=1, logs={"loss": 1.0}) == [False]
    assert any(run.emit("after_step", step=2, logs={"loss": 0.5}))
    assert seen == [(1, 1.0), (2, 0.5)]


def test_runtime_modules_do_not_need_pytest():
    """pytest is a dev extra: nothing a user runs may import it (tunesmith.testing is for tests)."""
    import subprocess
    import sys

    code = (
        "import sys, tunesmith\n"
        "regs = tunesmith.registry()\n"
        "import tunesmith.core.models, tunesmith.core.data_clean, tunesmith.core.paths, tunesmith.core.training\n"
        "from tunesmith.core.paths import cache_dir, default_gguf_path; cache_dir(); default_gguf_path()\n"
        "print('pytest' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
