"""``tunesmith sweep CONFIG --space SPACE.yaml --trials N [--parallel K]``."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.commands._common import echo_json, json_option, set_option


@click.command("sweep")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--space", "space_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The search space: config keys -> {loguniform|uniform|int|logint|choice: ...}.")
@click.option("--trials", type=int, required=True, help="How many trials in total (a resumed sweep counts the earlier ones).")
@click.option("--parallel", type=int, default=1, show_default=True, help="Worker processes training trials at once.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="The sweep folder (trials, study.db, results, plots). Default: <output_dir>-sweep.")
@click.option("--metric", default="eval_loss", show_default=True,
              help="What a trial scores: a training result (eval_loss, train_loss, best_eval_loss) or an "
                   "evaluator metric (generation.exact_match: the trial is evaluated too).")
@click.option("--direction", type=click.Choice(["minimize", "maximize"]), default=None,
              help="Default: minimize for losses, maximize for evaluator metrics.")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True,
              help="Stop unpromising trials early on the evaluation loss.")
@click.option("--prune-startup-trials", type=int, default=2, show_default=True,
              help="Trials that finish before the median pruner prunes any.")
@click.option("--prune-warmup-steps", type=int, default=0, show_default=True, help="Steps of a trial before it may be pruned.")
@click.option("--seed", type=int, default=None, help="Sampler seed (default: the config's seed).")
@click.option("--study-name", default=None, help="The Optuna study's name (default: the config's name).")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///<sweep folder>/study.db).")
@click.option("--enqueue", "enqueue_path", type=click.Path(exists=True, dir_okay=False),
              help="A YAML list of {config key: value} to try first (known-good values; each is tried once).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep each trial's checkpoints (default: only final/).")
@click.option("--register", "register_best", is_flag=True,
              help="Register the best trial's model in the config's registry (registry: section, its back-end).")
@set_option
@json_option
def command(config: str, space_path: str, trials: int, parallel: int, output: str | None, metric: str,
            direction: str | None, sampler: str, pruner: str, prune_startup_trials: int, prune_warmup_steps: int,
            seed: int | None, study_name: str | None, storage: str | None, enqueue_path: str | None, keep_checkpoints: bool,
            register_best: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    """Tune hyper-parameters of CONFIG with Optuna: each trial a run directory.

    \b
      # space.yaml
      training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
      peft.r: {choice: [4, 8, 16]}

    Killed? Run the same command again: finished trials are kept, the interrupted one
    runs again. Writes OUT/results.json, OUT/best.yaml (the base config with the best
    values), OUT/plots/history.png and importance.png.
    """
    import sys

    from tunesmith.cli import get_state
    from tunesmith.commands._common import load_cli_config
    from tunesmith.sweep.report import print_table, register_best as do_register
    from tunesmith.sweep.runner import SweepSpec, run_sweep
    from tunesmith.sweep.space import load_space

    cfg = load_cli_config(config, overrides)
    params = load_space(space_path)  # errors with the space file's line, before anything else
    from tunesmith.core.config import read_yaml
    from tunesmith.sweep.runner import check_enqueue

    space_data, _ = read_yaml(space_path)
    enqueue = check_enqueue(_read_list(enqueue_path), params,
                            enqueue_path) if enqueue_path else []
    out = Path(output) if output else Path(cfg.resolve_path(cfg.output_dir)).with_name(
        Path(cfg.resolve_path(cfg.output_dir)).name + "-sweep")
    if direction is None:
        direction = "maximize" if "." in metric else "minimize"
    spec = SweepSpec(
        config=str(Path(config).resolve()), overrides=list(overrides), space=space_data,
        space_source=str(Path(space_path).resolve()), trials=trials, out_dir=str(out.resolve()), metric=metric,
        direction=direction, sampler=sampler, pruner=pruner, prune_startup_trials=prune_startup_trials,
        prune_warmup_steps=prune_warmup_steps, seed=cfg.seed if seed is None else seed,
        storage=storage, study_name=study_name or cfg.name or "sweep", keep_checkpoints=keep_checkpoints,
        disable=list(get_state().disable), enqueue=enqueue,
    )
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))
    import contextlib

    # with --json, stdout carries the report only: what training prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        report = run_sweep(spec, parallel=parallel, say=say)
        if register_best:
            entry = do_register(spec, report, get_state().registries(tuple(cfg.plugins.disable)))
            report["registered"] = {"version": entry["version"], "stage": entry["stage"], "artifacts": entry["artifacts"]}
    if as_json:
        echo_json(report)
        return
    print_table(report)
    if register_best:
        click.echo(f"registered {report['registered']['version']} ({report['registered']['stage']})")


def _read_list(path: str) -> list:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or []
