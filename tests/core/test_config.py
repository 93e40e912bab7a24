"""Config: YAML in, pydantic-validated config out, with errors that say where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import tunesmith
from tunesmith.core import plugins
from tunesmith.core.config import apply_overrides, config_schema, load_config
from tunesmith.core.errors import ConfigError


class FakeSource:
    name = "default"
    description = "test source"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        revision: str = "main"

    def resolve(self, options):
        return Path(".")


class FakeLora:
    name = "lora"
    description = "test lora"
    mergeable = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        r: int = Field(8, gt=0)
        alpha: int = 16
        target_modules: str | list[str] = "all-linear"

    def apply(self, model, options, context):
        return model

    def save(self, model, path):
        pass

    def load(self, model, path, options=None):
        return model


class FakeSFT:
    name = "sft"
    description = "test objective"

    def train(self, session, options):
        return {}


class FakePlugin:
    @staticmethod
    @tunesmith.hookimpl
    def register_model_sources(register):
        register(FakeSource())

    @staticmethod
    @tunesmith.hookimpl
    def register_objectives(register):
        register(FakeSFT())

    @staticmethod
    @tunesmith.hookimpl
    def register_peft_methods(register):
        register(FakeLora())


@pytest.fixture
def regs(monkeypatch, tunesmith_plugin):
    monkeypatch.setenv(plugins.ENV_ALLOW, "")
    tunesmith_plugin(FakePlugin, "fake")
    return tunesmith.registry()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_follow_the_brief(regs, tmp_path):
    cfg = load_config(write(tmp_path, "output_dir: runs/x\n"), registries=regs)
    assert cfg.peft.method == "lora" and cfg.peft.options.r == 8 and cfg.peft.options.alpha == 16
    t = cfg.training
    assert (t.epochs, t.batch_size, t.gradient_accumulation_steps, t.max_length) == (3, 4, 4, 2048)
    assert (t.lr_scheduler, t.warmup_ratio, t.weight_decay, t.max_grad_norm) == ("cosine", 0.03, 0.01, 1.0)
    assert (cfg.data.split.train, cfg.data.split.validation, cfg.data.split.test, cfg.data.split.seed) == (0.8, 0.1, 0.1, 42)
    assert cfg.resolve_path("runs/x") == tmp_path / "runs/x"


def test_typo_names_key_line_and_suggestion(regs, tmp_path):
    p = write(tmp_path, "training:\n  max_steps: 10\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, registries=regs)
    msg = str(err.value)
    assert f"{p}:3" in msg
    assert "training.learnig_rate" in msg
    assert "did you mean 'learning_rate'" in msg
    assert err.value.line == 3


def test_unknown_top_level_key(regs, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trainig'.*did you mean 'training'"):
        load_config(write(tmp_path, "trainig: {}\n"), registries=regs)


def test_plugin_options_are_validated_by_the_plugin(regs, tmp_path):
    p = write(tmp_path, "peft:\n  method: lora\n  r: 16\n  alhpa: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, registries=regs)
    assert "peft.alhpa" in str(err.value) and "did you mean 'alpha'" in str(err.value)
    assert err.value.line == 4
    p = write(tmp_path, "peft:\n  method: lora\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: peft.r: .*greater than 0"):
        load_config(p, registries=regs)


def test_unknown_plugin_name_is_a_config_error(regs, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "peft:\n  method: lorra\n"), registries=regs)
    assert "peft.method" in str(err.value) and "did you mean 'lora'" in str(err.value)
    assert err.value.line == 2


def test_bad_value_type_and_literal(regs, tmp_path):
    with pytest.raises(ConfigError, match="training.lr_scheduler"):
        load_config(write(tmp_path, "training: {lr_scheduler: cosine_annealing}\n"), registries=regs)
    with pytest.raises(ConfigError, match="objective"):
        load_config(write(tmp_path, "objective: rlhf\n"), registries=regs)


def test_invalid_yaml_names_the_line(regs, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "training:\n  max_steps: [1, 2\n"), registries=regs)
    assert "invalid YAML" in str(err.value) and err.value.line is not None


def test_yaml_is_loaded_safely(regs, tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n"), registries=regs)


def test_overrides(regs, tmp_path):
    p = write(tmp_path, "losses: [{name: causal_lm}]\ntraining: {max_steps: 5}\n")
    data = apply_overrides(
        {"losses": [{"name": "a"}], "training": {"max_steps": 5}},
        ["training.max_steps=20", "losses.0.weight=0.5", "peft.r=4", "data.cleaners=[]"],
    )
    assert data["training"]["max_steps"] == 20
    assert data["losses"][0] == {"name": "a", "weight": 0.5}
    assert data["peft"] == {"r": 4}
    assert data["data"]["cleaners"] == []
    cfg = load_config(p, ["training.learning_rate=1e-4", "peft.r=4"], registries=regs, check_plugins=False)
    assert cfg.training.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_schema_includes_plugin_options(regs):
    schema = config_schema(regs)
    peft = schema["$defs"]["PeftSection"]
    titles = [v["title"] for v in peft["oneOf"]]
    assert titles == ["peft_methods:lora"]
    props = peft["oneOf"][0]["properties"]
    assert props["r"]["default"] == 8 and props["method"]["const"] == "lora"
    json.dumps(schema)


def test_resolved_config_includes_plugin_defaults(regs, tmp_path):
    cfg = load_config(write(tmp_path, "peft: {method: lora, r: 4}\n"), registries=regs)
    d = cfg.to_dict()
    assert d["peft"] == {"method": "lora", "r": 4, "alpha": 16, "target_modules": "all-linear"}
    assert len(cfg.hash()) == 16
