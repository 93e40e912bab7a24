"""Training state without pickle: optimiser, scheduler, scaler and RNG states as
safetensors (tensors) + JSON (everything else).

transformers' Trainer writes ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
and ``training_args.bin`` with ``torch.save`` (pickle). tunesmith's checkpoints
hold these instead (the trainer overrides the save and load methods, see
:mod:`tunesmith.core.training`; the PPO loop uses the same functions):

* ``optimizer.safetensors`` - every tensor of ``optimizer.state_dict()["state"]``
  as ``"<param index>.<name>"``; ``optimizer.json`` - the param groups and the
  non-tensor state entries;
* ``scheduler.json``, ``scaler.json`` - the (JSON-able) state dicts;
* ``rng_state[_<rank>].safetensors`` + ``.json`` - torch CPU/CUDA generator states
  (tensors), Python's and NumPy's Mersenne-Twister states (JSON).

Every file is written atomically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tunesmith.core.io import atomic_path, atomic_write_json

OPTIMIZER = "optimizer"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def _json_default(obj: Any) -> Any:
    import torch

    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, json.loads(json.dumps(data, default=_json_default)))


# --------------------------------------------------------------------------- optimizer
def save_optimizer(optimizer: Any, folder: str | Path, name: str = OPTIMIZER) -> None:
    import torch

    folder = Path(folder)
    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    _save_tensors(tensors, folder / f"{name}.safetensors")
    _write_json(folder / f"{name}.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def has_optimizer(folder: str | Path, name: str = OPTIMIZER) -> bool:
    folder = Path(folder)
    return (folder / f"{name}.safetensors").is_file() and (folder / f"{name}.json").is_file()


def load_optimizer(optimizer: Any, folder: str | Path, name: str = OPTIMIZER) -> None:
    """Load into ``optimizer``; tensors go to the device of their parameter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    state: dict[int, dict] = {}
    for key, v in load_file(str(folder / f"{name}.safetensors")).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, entries in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    for saved, cur in zip(groups, current):  # JSON gave lists where the optimizer keeps tuples (betas)
        for k, v in list(saved.items()):
            if isinstance(cur.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- scheduler / scaler
def save_state_dict_json(obj: Any, path: str | Path) -> None:
    _write_json(Path(path), obj.state_dict())


def load_state_dict_json(obj: Any, path: str | Path) -> None:
    obj.load_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- RNG
def rng_files(folder: str | Path, rank: int | None = None) -> tuple[Path, Path]:
    stem = "rng_state" if rank is None else f"rng_state_{rank}"
    folder = Path(folder)
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def save_rng_state(folder: str | Path, rank: int | None = None) -> None:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    import numpy as np
    import torch

    tensors: dict[str, Any] = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"cuda.{i}"] = st
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensor_path, json_path = rng_files(folder, rank)
    _save_tensors(tensors, tensor_path)
    _write_json(json_path, {
        "python": [version, list(mt), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    })


def load_rng_state(folder: str | Path, rank: int | None = None) -> bool:
    """Restore what :func:`save_rng_state` wrote; False when the files are not there."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    tensor_path, json_path = rng_files(folder, rank)
    if not (tensor_path.is_file() and json_path.is_file()):
        return False
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(tensor_path))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(states)
        else:  # a different number of devices: at least the current one
            torch.cuda.random.set_rng_state(states[min(torch.cuda.current_device(), len(states) - 1)])
    return True
