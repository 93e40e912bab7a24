"""The run config: one YAML file, validated by pydantic.

Top-level names are the product's interface; what is inside a plugin's section is
validated by that plugin's ``Options`` model. Errors name the file, the key path and
the line, and suggest the nearest valid key for a typo. Unknown keys are errors.

Each area owner extends *their own* section model below; plugin options stay in the
plugins.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from tunesmith.core.errors import ConfigError, TunesmithError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class PluginSection(BaseModel):
    """A section that names a plugin; its other keys belong to the plugin's ``Options``."""

    model_config = ConfigDict(extra="allow")
    _options: Any = PrivateAttr(default=None)
    #: the config key that holds the plugin's name, and the plugin area
    _key: ClassVar[str] = "name"
    _area: ClassVar[str] = ""

    @property
    def plugin_name(self) -> str:
        return getattr(self, self._key)

    @property
    def options(self) -> Any:
        """The plugin's validated ``Options`` (set by :func:`validate_config`)."""
        if self._options is None:
            raise TunesmithError(f"options of '{self.plugin_name}' were not validated against its plugin")
        return self._options

    def plugin_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# --------------------------------------------------------------------------- model
class ModelSection(PluginSection):
    """``model:`` - where the base model comes from (a model-source plugin)."""

    _key: ClassVar[str] = "source"
    _area: ClassVar[str] = "model_sources"
    source: str = "default"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None


# --------------------------------------------------------------------------- data
class NamedPlugin(PluginSection):
    name: str


class CleanerSpec(NamedPlugin):
    _area: ClassVar[str] = "cleaners"


class DataSource(Strict):
    path: str
    weight: float | None = None
    format: str = "auto"


class SplitSection(Strict):
    train: float = 0.8
    validation: float = 0.1
    test: float = 0.1
    seed: int = 42
    stratify: str | None = None

    @field_validator("test")
    @classmethod
    def _sums_to_one(cls, v: float, info: Any) -> float:
        total = info.data.get("train", 0.8) + info.data.get("validation", 0.1) + v
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1.0, got {total:g}")
        return v


class MixingSection(Strict):
    strategy: Literal["proportional", "equal", "temperature"] = "proportional"
    temperature: float = 2.0
    seed: int = 42


class ReplaySection(Strict):
    path: str
    ratio: float = Field(0.1, ge=0.0, lt=1.0)
    format: str = "auto"


class DataSection(Strict):
    path: str | None = None
    sources: list[DataSource] | None = None
    format: str = "auto"
    #: None means the defaults (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    cleaners: list[CleanerSpec] | None = None
    split: SplitSection = Field(default_factory=SplitSection)
    mixing: MixingSection = Field(default_factory=MixingSection)
    replay: ReplaySection | None = None
    skip_invalid: bool = False
    #: how .txt files become records: blank-line separated paragraphs, lines, or whole files
    text_unit: Literal["paragraph", "line", "file"] = "paragraph"
    #: separate files for evaluation instead of the split's validation/test parts
    validation_path: str | None = None
    test_path: str | None = None


# --------------------------------------------------------------------------- peft
class PeftSection(PluginSection):
    """``peft:`` - the PEFT method (a plugin) and its options."""

    _key: ClassVar[str] = "method"
    _area: ClassVar[str] = "peft_methods"
    method: str = "lora"


# --------------------------------------------------------------------------- losses
class LossSpec(NamedPlugin):
    _area: ClassVar[str] = "losses"
    weight: float = 1.0


# --------------------------------------------------------------------------- training
class EarlyStopping(Strict):
    patience: int = 3
    threshold: float = 0.01


class LoggerSpec(NamedPlugin):
    """An entry of ``training.report_to``: a logger plugin's name (``mlflow``) or a
    mapping of its name and options (``{name: mlflow, tracking_uri: ...}``)."""

    _area: ClassVar[str] = "loggers"

    def __eq__(self, other: object) -> bool:  # "tensorboard" in cfg.training.report_to
        if isinstance(other, str):
            return self.name == other
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


class DistributedSection(Strict):
    """``training.distributed:`` - who starts the training processes (docs/distributed.md).

    ``none`` trains in this process, or in each process an outside launcher started
    (``torchrun``, ``accelerate launch``); ``torchrun`` makes tunesmith start
    ``num_workers`` processes on this machine itself; ``ray`` runs the same session
    on ``num_workers`` Ray Train workers (``pip install 'tunesmith[ray]'``).
    """

    backend: Literal["none", "torchrun", "ray"] = Field(
        "none", description="none: this process (or each process torchrun / accelerate launch started); "
                            "torchrun: tunesmith starts num_workers processes here; ray: num_workers Ray Train workers.")
    num_workers: int = Field(2, ge=1, description="Training processes (torchrun, ray); each trains batch_size rows per step.")
    use_gpu: bool = Field(False, description="ray: one GPU per worker (NCCL) instead of CPU workers (gloo).")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="ray: what each worker reserves, e.g. {CPU: 4, GPU: 1}; unset: {CPU: 1} (and {GPU: 1} with use_gpu).")
    address: str | None = Field(
        None, description="ray: the cluster to join (head-node:6379 or auto); unset: start a local one.")
    storage: str | None = Field(
        None, description="ray: where Ray keeps the run's state (a path every node sees, or a URI such as "
                          "s3://bucket/runs); unset: RUN/ray. Checkpoints stay in RUN/checkpoints: on several nodes put "
                          "output_dir on a filesystem every node sees.")
    max_failures: int = Field(
        3, ge=0, description="ray: restarts of the worker group after a worker dies; each resumes from the last complete checkpoint.")


class TrainingSection(Strict):
    """``training:`` - optimisation settings. Defaults follow the brief (SEED-FACTS)."""

    epochs: float = 3
    max_steps: int = -1
    learning_rate: Union[float, Literal["auto"]] = "auto"
    batch_size: int = 4
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 4
    max_length: int = 2048
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    #: extra scheduler arguments, e.g. {num_cycles: 2} (cosine_with_restarts), {power: 2.0} (polynomial)
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    #: a transformers optimizer name (adamw_torch, adamw_torch_fused, adamw_8bit, sgd, ...);
    #: auto = transformers' default for the installed torch (fused AdamW on torch >= 2.8)
    optimizer: str = "auto"
    #: auto = bf16 compute where the hardware multiplies bf16 natively (Ampere+ GPUs; CPUs with
    #: AMX or AVX-512 BF16, for models of hidden size >= 256 with a frozen base), else fp32
    #: (fp16 on pre-Ampere GPUs); bf16 stores the frozen base in bf16, trainable weights fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: torch.compile of the repeated blocks (inductor, persistent cache in the user cache dir):
    #: auto = only when the run is long enough to amortise the compile (docs/training.md)
    compile: Literal["off", "on", "auto"] = "auto"
    tf32: bool = True
    gradient_checkpointing: bool = True
    packing: Literal[False, True, "padding_free", "group_by_length"] = False
    completion_only_loss: bool = True
    train_on_eos: bool = True
    eval_steps: int = 100
    save_steps: int = 100
    logging_steps: int = 10
    save_total_limit: int = 3
    load_best_model_at_end: bool = True
    early_stopping: EarlyStopping | None = Field(default_factory=EarlyStopping)
    seed: int = 42
    num_workers: int = 0
    #: experiment loggers (plugins): names or {name: ..., options}; jsonl (metrics.jsonl) is always on
    report_to: list[LoggerSpec] | None = Field(
        None,
        description="Experiment loggers: names (tensorboard, mlflow, wandb) or {name: mlflow, tracking_uri: ...}; "
                    "unset: the loggers on by default (tensorboard); [] or none: none. jsonl (metrics.jsonl) is always on.",
    )

    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Who starts the training processes (none, torchrun, ray); docs/distributed.md.")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean
        return ("on" if v else "off") if isinstance(v, bool) else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _logger_names(cls, v: Any) -> Any:
        if v is None or v == "none":
            return [] if v == "none" else None
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v if x != "none"]
        return v


# --------------------------------------------------------------------------- evaluation / export / registry
class EvaluatorSpec(NamedPlugin):
    _area: ClassVar[str] = "evaluators"


class ExportSpec(PluginSection):
    _key: ClassVar[str] = "format"
    _area: ClassVar[str] = "exporters"
    format: str


class RegistrySection(PluginSection):
    """``registry:`` - where the register stage puts versions: ``backend`` (a registry
    back-end plugin: ``local`` versions.json, ``mlflow`` Model Registry) and its options."""

    _key: ClassVar[str] = "backend"
    _area: ClassVar[str] = "registry_backends"
    backend: str = "local"
    path: str = "registry"
    name: str | None = None
    stage: Literal["registered", "canary", "staging", "production", "archived"] = "registered"
    enabled: bool = True


class PluginsSection(Strict):
    disable: list[str] = Field(default_factory=list)
    strict: bool = False


# --------------------------------------------------------------------------- objective
class ObjectiveSection(PluginSection):
    """``objective:`` - what the run optimises (an objective plugin) and its options.

    Written as a name (``objective: dpo``) or a mapping whose other keys belong to
    the objective's ``Options`` (``objective: {name: grpo, num_generations: 8}``).
    """

    _area: ClassVar[str] = "objectives"
    name: str = "sft"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class RewardSpec(NamedPlugin):
    """A reward-function plugin with a weight (the ``rewards:`` of RL objectives)."""

    _area: ClassVar[str] = "reward_functions"
    weight: float = 1.0


#: top-level keys that moved, and where to
MOVED_KEYS = {
    "rl": "the rl: section moved into the objective's own section: write "
          "objective: {name: grpo, rewards: [...], num_generations: 4, ...} (the same keys; see docs/rl.md)",
}


# --------------------------------------------------------------------------- the whole config
def nested_sections(path: str, options: Any) -> list[tuple[str, PluginSection]]:
    """Plugin sections held by a plugin's options (fields typed as sections or lists of them)."""
    out: list[tuple[str, PluginSection]] = []
    if not isinstance(options, BaseModel):
        return out
    for field in type(options).model_fields:
        value = getattr(options, field, None)
        if isinstance(value, PluginSection):
            out.append((f"{path}.{field}", value))
        elif isinstance(value, list):
            out.extend((f"{path}.{field}.{i}", v) for i, v in enumerate(value) if isinstance(v, PluginSection))
    return out


class Config(Strict):
    name: str | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    chat_template: str | None = Field(
        None,
        description="How conversations become text: a built-in template (chatml, llama3, gemma, mistral, alpaca; "
        "`tunesmith plugins` lists them) or a Jinja file (relative to the config file). Unset: the tokenizer's "
        "own, or alpaca for a base model that ships none. Saved with every artefact (docs/models.md).",
    )
    data: DataSection = Field(default_factory=DataSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    losses: list[LossSpec] | None = None
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: list[EvaluatorSpec] = Field(default_factory=list)
    export: list[ExportSpec] = Field(default_factory=list)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    plugins: PluginsSection = Field(default_factory=PluginsSection)
    output_dir: str = "runs/run"
    seed: int = 42

    _source: str = PrivateAttr(default="<config>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def source(self) -> str:
        return self._source

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the config are read from (the config file's folder)."""
        return self._base_dir

    def resolve_path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def plugin_sections(self, nested: bool = True) -> list[tuple[str, PluginSection]]:
        """Every (key path, section) that names a plugin; ``nested`` adds those inside
        plugins' validated options (an objective's ``rewards``)."""
        out: list[tuple[str, PluginSection]] = [("model", self.model), ("objective", self.objective), ("peft", self.peft)]
        for i, c in enumerate(self.data.cleaners or []):
            out.append((f"data.cleaners.{i}", c))
        for i, l in enumerate(self.losses or []):
            out.append((f"losses.{i}", l))
        for i, e in enumerate(self.evaluation):
            out.append((f"evaluation.{i}", e))
        for i, x in enumerate(self.export):
            out.append((f"export.{i}", x))
        for i, lg in enumerate(self.training.report_to or []):
            out.append((f"training.report_to.{i}", lg))
        if "backend" in self.registry.model_fields_set or self.registry.plugin_fields():
            out.append(("registry", self.registry))  # the default (local, no options) needs no check
        if nested:
            for path, section in list(out):
                out.extend(nested_sections(path, section._options))
        return out

    def to_dict(self) -> dict:
        """The resolved config as plain data, plugin options included with their defaults."""
        data = self.model_dump(mode="json")
        for path, section in self.plugin_sections():
            if section._options is not None:
                target = _get_path(data, path)
                target.update(section._options.model_dump(mode="json"))
        return data

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
class _LineLoader(yaml.SafeLoader):
    """A safe loader; line numbers come from a separate compose pass."""


def _line_map(text: str) -> dict[tuple, int]:
    """Key path (tuple of keys/indices) -> 1-based line of that key in the YAML text."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", source=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(
            f"invalid YAML: {getattr(exc, 'problem', None) or exc}",
            source=str(p),
            line=(mark.line + 1) if mark else None,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {type(data).__name__}", source=str(p), line=1)
    return data, _line_map(text)


def _get_path(data: Any, path: str) -> Any:
    cur = data
    for part in path.split(".") if path else []:
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML: numbers, lists, ...)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        cur: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(cur, list):
                idx = _index(part, key)
                while len(cur) <= idx:
                    cur.append({})
                cur = cur[idx]
                continue
            if part not in cur or cur[part] is None:
                cur[part] = [] if nxt.isdigit() else {}
            cur = cur[part]
            if not isinstance(cur, (dict, list)):
                raise ConfigError(f"cannot set '{key}': '{part}' is not a section", key=key)
        last = parts[-1]
        if isinstance(cur, list):
            idx = _index(last, key)
            while len(cur) <= idx:
                cur.append(None)
            cur[idx] = value
        else:
            cur[last] = value
    return data


def _index(part: str, key: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"cannot set '{key}': '{part}' should be a list index", key=key)
    return int(part)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the model found at ``loc`` (for typo suggestions)."""
    import typing

    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        # unwrap Optional / list / Union to the first BaseModel inside
        stack = [ann]
        found = None
        while stack:
            t = stack.pop(0)
            if isinstance(t, type) and issubclass(t, BaseModel):
                found = t
                break
            stack.extend(typing.get_args(t))
        cur = found
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _format_errors(
    exc: ValidationError, *, model: type[BaseModel], prefix: tuple, lines: dict[tuple, int], source: str
) -> ConfigError:
    messages = []
    first_line = None
    first_key = None
    for err in exc.errors():
        loc = tuple(err["loc"])
        full = prefix + loc
        key = ".".join(str(p) for p in full)
        line = lines.get(full) or _nearest_line(lines, full)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key '{loc[-1]}'"
            if close:
                msg += f"; did you mean '{close[0]}'?"
            elif valid:
                msg += f"; valid keys: {', '.join(valid)}"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
        where = f"{source}:{line}" if line else source
        messages.append(f"{where}: {key}: {msg}")
        if first_line is None:
            first_line, first_key = line, key
    summary = messages[0] if len(messages) == 1 else messages[0] + f" (and {len(messages) - 1} more)"
    err = ConfigError(summary, errors=messages)
    err.key, err.line, err.source = first_key, first_line, source
    return err


def _nearest_line(lines: dict[tuple, int], path: tuple) -> int | None:
    while path:
        path = path[:-1]
        if path in lines:
            return lines[path]
    return None


def validate_config(
    data: dict,
    *,
    registries: Any = None,
    source: str = "<config>",
    lines: dict[tuple, int] | None = None,
    base_dir: Path | None = None,
    check_plugins: bool = True,
) -> Config:
    lines = lines or {}
    for key, why in MOVED_KEYS.items():
        if isinstance(data, dict) and key in data:
            raise ConfigError(why, key=key, source=source, line=lines.get((key,)))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise _format_errors(exc, model=Config, prefix=(), lines=lines, source=source) from None
    cfg._source = source
    cfg._base_dir = base_dir or Path.cwd()
    if check_plugins:
        if registries is None:
            from tunesmith.core.plugins import get_registries

            registries = get_registries(disable=tuple(cfg.plugins.disable), strict=cfg.plugins.strict)
        validate_plugin_sections(cfg, registries, lines=lines)
    return cfg


def validate_plugin_sections(cfg: Config, registries: Any, *, lines: dict[tuple, int] | None = None) -> None:
    """Validate each plugin-named section against its plugin's ``Options`` (and the
    plugin sections inside those options, such as an objective's rewards)."""
    _validate_sections(cfg, registries, cfg.plugin_sections(nested=False), lines or {})


def _validate_sections(cfg: Config, registries: Any, sections: list[tuple[str, PluginSection]], lines: dict[tuple, int]) -> None:
    from tunesmith.core.errors import PluginError

    for path, section in sections:
        area = section._area
        key_path = tuple(int(p) if p.isdigit() else p for p in path.split("."))
        try:
            plugin = registries[area].get(section.plugin_name)
        except PluginError as exc:
            line = lines.get(key_path + (section._key,)) or lines.get(key_path)
            raise ConfigError(str(exc), key=f"{path}.{section._key}", source=cfg.source, line=line) from None
        options_model = getattr(plugin, "Options", None)
        extra = section.plugin_fields()
        if options_model is None:
            if extra:
                k = next(iter(extra))
                raise ConfigError(
                    f"unknown key '{k}': the {registries[area].area.noun} '{section.plugin_name}' takes no options",
                    key=f"{path}.{k}",
                    source=cfg.source,
                    line=lines.get(key_path + (k,)),
                )
            section._options = None
            continue
        try:
            section._options = options_model.model_validate(extra)
        except ValidationError as exc:
            raise _format_errors(exc, model=options_model, prefix=key_path, lines=lines, source=cfg.source) from None
        _validate_sections(cfg, registries, nested_sections(path, section._options), lines)


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    registries: Any = None,
    check_plugins: bool = True,
) -> Config:
    data, lines = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_config(
        data,
        registries=registries,
        source=str(path),
        lines=lines,
        base_dir=Path(path).resolve().parent,
        check_plugins=check_plugins,
    )


def config_schema(registries: Any) -> dict:
    """JSON Schema of the whole config, each plugin section expanded with its plugins' options."""
    schema = Config.model_json_schema()
    defs = schema.setdefault("$defs", {})
    # objectives first: their options bring nested sections (rewards) into $defs
    sections = {
        "ObjectiveSection": ("objectives", "name"),
        "ModelSection": ("model_sources", "source"),
        "PeftSection": ("peft_methods", "method"),
        "CleanerSpec": ("cleaners", "name"),
        "LossSpec": ("losses", "name"),
        "EvaluatorSpec": ("evaluators", "name"),
        "ExportSpec": ("exporters", "format"),
        "RewardSpec": ("reward_functions", "name"),
        "LoggerSpec": ("loggers", "name"),
        "RegistrySection": ("registry_backends", "backend"),
    }
    for def_name, (area, key) in sections.items():
        base = defs.get(def_name)
        if base is None:
            continue
        variants = []
        for name, obj in registries[area].items():
            opts = getattr(obj, "Options", None)
            sub = opts.model_json_schema() if opts is not None else {"type": "object", "properties": {}}
            for d_name, d in sub.pop("$defs", {}).items():
                defs.setdefault(d_name, d)
            props = dict(base.get("properties", {}))
            props.update(sub.get("properties", {}))
            props[key] = {"const": name, "description": getattr(obj, "description", "")}
            variants.append(
                {
                    "title": f"{area}:{name}",
                    "type": "object",
                    "properties": props,
                    "required": sorted(set(sub.get("required", [])) | ({key} if key in base.get("required", []) else set())),
                    "additionalProperties": False,
                }
            )
        if variants:
            defs[def_name] = {"title": def_name, "description": base.get("description", ""), "oneOf": variants}
    return schema
