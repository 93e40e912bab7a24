"""Hyper-parameter sweeps on Optuna (``tunesmith sweep``): search spaces over any config
key, TPE by default, pruning on the evaluation loss through the ``after_log`` hook,
a resumable sqlite study, one run directory per trial, a results table, PNG plots
and the best config written out (docs/sweeps.md).

Not part of core: it drives core's training session like any user of the API.
"""

from tunesmith.sweep.runner import SweepError, SweepSpec, run_sweep
from tunesmith.sweep.space import Param, load_space, parse_space

__all__ = ["Param", "SweepError", "SweepSpec", "load_space", "parse_space", "run_sweep"]
