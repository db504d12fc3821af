"""``python -m lorascope.train CONFIG.toml [--set k=v]``; also the entry for DDP:
``torchrun --nproc_per_node 2 -m lorascope.train CONFIG.toml``."""

from lorascope.cli.train import train

if __name__ == "__main__":
    train()
