"""Search spaces: which config keys a sweep varies and how.

A space file maps config keys (the ``--set`` paths) to a distribution::

    training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
    peft.r: {choice: [4, 8, 16]}
    training.warmup_ratio: {uniform: [0.0, 0.1]}
    training.batch_size: {int: [2, 8, 2]}        # low, high[, step]
    training.max_steps: {logint: [20, 200]}
    peft.dropout: [0.0, 0.05, 0.1]               # a plain list is a choice

Keys may also be nested (``training: {learning_rate: {loguniform: [...]}}``).
Errors name the space file and the line.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.core.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "logint", "choice")


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` picks for this key."""
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step)
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.kind == "logint")
        return trial.suggest_categorical(self.key, list(self.choices))

    def sample_values(self) -> list[Any]:
        """Values to check the config with before the first trial (the ends, every choice)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice {list(self.choices)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}" + (f", step {self.step:g}" if self.step else "") + "]"

    def as_dict(self) -> dict:
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        return {self.kind: [self.low, self.high] + ([self.step] if self.step is not None else [])}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def parse_space(data: Any, *, source: str = "<space>", lines: dict | None = None) -> list[Param]:
    """The parameters of a space mapping (see the module docstring)."""
    lines = lines or {}

    def err(msg: str, path: tuple) -> ConfigError:
        line = lines.get(path)
        while line is None and path:
            path = path[:-1]
            line = lines.get(path)
        return ConfigError(msg, source=source, line=line)

    if not isinstance(data, dict) or not data:
        raise ConfigError("a search space is a mapping of config keys to distributions "
                          "(training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]})", source=source, line=1)
    out: list[Param] = []

    def walk(node: dict, prefix: tuple) -> None:
        for k, spec in node.items():
            path = prefix + (k,)
            key = ".".join(str(p) for p in path)
            if isinstance(spec, list):
                spec = {"choice": spec}
            if not isinstance(spec, dict) or not spec:
                raise err(f"{key}: expected a distribution ({', '.join(KINDS)}) or a list of choices, got {spec!r}", path)
            if len(spec) != 1 or next(iter(spec)) not in KINDS:
                if any(x in KINDS for x in spec):
                    raise err(f"{key}: one distribution per key, got {', '.join(map(str, spec))}", path)
                if len(spec) == 1 and not isinstance(next(iter(spec.values())), dict):
                    raise err(f"{key}: unknown distribution '{next(iter(spec))}' (use {', '.join(KINDS)})", path)
                walk(spec, path)  # a nested section
                continue
            kind, args = next(iter(spec.items()))
            out.append(_param(key, kind, args, lambda m: err(f"{key}: {m}", path)))

    walk(data, ())
    keys = [p.key for p in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"{dup}: listed twice", source=source)
    return out


def _param(key: str, kind: str, args: Any, err: Any) -> Param:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise err("choice takes a non-empty list")
        for c in args:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise err(f"choices must be numbers, strings, booleans or null, got {c!r}")
        if len(set(map(repr, args))) != len(args):
            raise err("choices repeat")
        return Param(key, kind, choices=tuple(args))
    if not isinstance(args, list) or len(args) not in (2, 3) or not all(_number(a) for a in args):
        raise err(f"{kind} takes [low, high] or [low, high, step] (numbers), got {args!r}")
    low, high = args[0], args[1]
    step = args[2] if len(args) == 3 else None
    if not low < high:
        raise err(f"{kind}: low must be below high, got [{low}, {high}]")
    if kind in ("loguniform", "logint") and low <= 0:
        raise err(f"{kind} needs low > 0, got {low}")
    if kind in ("int", "logint") and not all(float(a).is_integer() for a in args):
        raise err(f"{kind} takes whole numbers, got {args}")
    if kind in ("loguniform", "logint") and step is not None and kind == "loguniform":
        raise err("loguniform takes no step")
    if kind == "logint" and step not in (None, 1):
        raise err("logint takes no step")
    if step is not None and step <= 0:
        raise err(f"step must be positive, got {step}")
    if kind in ("int", "logint"):
        return Param(key, kind, int(low), int(high), int(step) if step is not None else None)
    return Param(key, kind, float(low), float(high), float(step) if step is not None else None)


def load_space(path: str | Path) -> list[Param]:
    from tunesmith.core.config import read_yaml

    data, lines = read_yaml(path)
    return parse_space(data, source=str(path), lines=lines)


def set_key(data: dict, key: str, value: Any) -> dict:
    """``data`` with the dotted ``key`` set to ``value`` (in place; sections created as needed;
    numeric parts index lists)."""
    parts = key.split(".")
    cur: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(cur, list):
            idx = int(part)
            while len(cur) <= idx:
                cur.append({})
            cur = cur[idx]
            continue
        if not isinstance(cur.get(part), (dict, list)):
            if part in cur and cur[part] is not None and not isinstance(cur[part], str):
                raise ConfigError(f"cannot vary '{key}': '{part}' is not a section", key=key)
            # a section given by name only (objective: sft, report_to: ...) becomes a mapping
            cur[part] = [] if nxt.isdigit() else ({"name": cur[part]} if isinstance(cur.get(part), str) else {})
        cur = cur[part]
    last = parts[-1]
    if isinstance(cur, list):
        idx = int(last)
        while len(cur) <= idx:
            cur.append(None)
        cur[idx] = value
    else:
        cur[last] = value
    return data


def with_params(data: dict, params: dict[str, Any]) -> dict:
    out = copy.deepcopy(data)
    for k, v in params.items():
        set_key(out, k, v)
    return out
