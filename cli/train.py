"""``lorascope train CONFIG.toml [--set key=value ...]``: parse, load the config, call the API."""

from __future__ import annotations

import json
import logging

import click

__all__ = ["train"]


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (TOML value syntax: r=16, target_modules=['query']).",
)
def train(config: str, overrides: tuple[str, ...]) -> None:
    """Train a LoRA adapter (or head-only / full fine-tuning) as CONFIG.toml says.

    Writes the PEFT adapter, the resolved train_config.json and metrics.json to out_dir.
    Under torchrun the run is data parallel (DDP).
    """
    from lorascope.train import load_config
    from lorascope.train import train as run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = run(load_config(config, overrides))
    if metrics:  # rank 0
        summary = {k: v for k, v in metrics.items() if k != "history"}
        click.echo(json.dumps(summary, indent=2))
