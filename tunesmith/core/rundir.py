"""The run directory: one folder per run, the same layout for every stage.

::

    runs/<name>/
      config.yaml            the resolved config (defaults filled in)
      data/                  train/validation/test.jsonl, rejects.jsonl,
                             report.md, report.json, token_lengths.png
      checkpoints/           checkpoint-<step>/ (complete ones only: written to a
                             temporary folder, then renamed)
      final/                 the trained adapter (PEFT folder) or full model, with
                             the tokenizer and tunesmith.json (base model, method)
      metrics.jsonl          one JSON object per logging/eval step
      tensorboard/
      plots/                 loss.png and other curves
      eval/                  report.md, report.json, charts, samples
      exports/<format>/      exported artefacts
      summary.json           what `tunesmith run` prints at the end
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.core.io import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_config(cls, cfg: Any) -> "RunDir":
        return cls(Path(cfg.resolve_path(cfg.output_dir)))

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def write_config(self, cfg: Any) -> Path:
        import yaml

        return atomic_write_text(self.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def write_summary(self, summary: dict) -> Path:
        return atomic_write_json(self.summary_path, summary)
