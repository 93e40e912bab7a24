"""The ``local`` generator: a model run through transformers (the default model unless told otherwise)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class LocalGenerator:
    name = "local"
    description = "Generate text with a local model through transformers (default: the bundled default model)."

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: dict[str, Any] = Field(
            default_factory=lambda: {"source": "default"},
            description="A model section as in the config's model: key, e.g. {source: hf, path: ./my-model}.",
        )
        max_new_tokens: int = Field(128, ge=1, description="Most tokens generated per prompt.")
        temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
        top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
        batch_size: int = Field(4, ge=1, description="Prompts generated together.")
        seed: int = Field(42, description="Random seed for sampling.")
        system: str | None = Field(None, description="Optional system message sent before each prompt.")

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Any]] = {}

    def _load(self, options: "LocalGenerator.Options", context: Any) -> tuple[Any, Any]:
        import json

        key = json.dumps(options.model, sort_keys=True)
        if key not in self._cache:
            from tunesmith.core.config import ModelSection
            from tunesmith.core.models import load_model_and_tokenizer

            registries = getattr(context, "registries", None)
            if registries is None:
                from tunesmith.core.plugins import get_registries

                registries = get_registries()
            section = ModelSection.model_validate(options.model)
            model, tok = load_model_and_tokenizer(section, registries, padding_side="left")
            model.eval()
            self._cache = {key: (model, tok)}  # keep one model in memory
        return self._cache[key]

    def generate(self, prompts: list[str], options: "LocalGenerator.Options | None", context: Any) -> list[str]:
        import torch

        options = options or self.Options()
        model, tok = self._load(options, context)
        torch.manual_seed(options.seed)
        out: list[str] = []
        from tqdm import tqdm

        for i in tqdm(range(0, len(prompts), options.batch_size), desc="generating", unit="batch",
                      disable=len(prompts) <= options.batch_size, mininterval=1.0):
            chunk = prompts[i : i + options.batch_size]
            texts = []
            for p in chunk:
                msgs = ([{"role": "system", "content": options.system}] if options.system else []) + [
                    {"role": "user", "content": p}
                ]
                texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "pad_token_id": tok.pad_token_id}
            if options.temperature > 0:
                kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                gen = model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        return out


@hookimpl
def register_generators(register: Any) -> None:
    register(LocalGenerator())
