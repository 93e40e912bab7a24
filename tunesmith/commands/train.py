"""``tunesmith train CONFIG [--resume] [--set key=value]``."""

from __future__ import annotations

import click

from tunesmith.commands._common import echo_json, json_option, load_cli_config, set_option


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the run's last complete checkpoint.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="The run directory (overrides output_dir).")
@set_option
@json_option
def command(config: str, resume: bool, output: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Fine-tune the model as CONFIG says (sft, cpt, dpo, reward, ppo, grpo).

    Writes the run directory: config.yaml, metrics.jsonl, tensorboard/, plots/loss.png,
    checkpoints/ (complete ones only) and final/ (adapter or model, tokenizer,
    tunesmith.json). Works under `torchrun --nproc_per_node=N` and `accelerate launch`.
    """
    from tunesmith.cli import get_state
    from tunesmith.core.session import train

    cfg = load_cli_config(config, overrides)
    regs = get_state().registries(tuple(cfg.plugins.disable))
    if output:
        from pathlib import Path

        cfg.output_dir = str(Path(output).resolve())
    result = train(cfg, regs, resume=resume)
    if as_json:
        echo_json(result)
    else:
        if "reward_start" in result:  # PPO / GRPO report the reward, not a loss
            progress = f"mean reward {result['reward_start']:.3f} -> {result['reward_end']:.3f}"
        else:
            progress = f"train loss {result.get('train_loss', float('nan')):.4f}"
        click.echo(
            f"done: {result.get('steps')} steps, {progress}"
            + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
            + f"; final model in {result.get('output_path')}"
        )
