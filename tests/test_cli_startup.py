"""Start-up cost of the command line: one command imports what it uses, not what the others do.

The commands are resolved lazily (``lorascope.cli.main._Group``), and h5py, rich and sqlite3 are
imported where they are used, so ``lorascope amplify`` pays for torch and the analysis but not
for HDF5, the collection database or the tracking code. Each check runs in a fresh interpreter:
this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import torch

from lorascope.cli import main

# The commands and their order as registered before they were loaded lazily.
COMMANDS = (
    "inspect",
    "spectrum",
    "similarity",
    "amplify",
    "weight-similarity",
    "rank",
    "resize",
    "merge",
    "verify-merge",
    "check",
    "intruders",
    "compare",
    "dynamics",
    "shared",
    "neighbors",
    "outliers",
    "report",
    "train",
    "scan",
)

# What amplify does not use (a module counts with its submodules).
NOT_FOR_AMPLIFY = (
    "h5py",
    "rich",
    "sqlite3",
    "dask",
    "lorascope.collection",
    "lorascope.tracking",
    "lorascope.train",
    "lorascope.report",
    "lorascope.cli.collection",
    "lorascope.cli.dynamics",
    "lorascope.cli.report",
    "lorascope.cli.scan",
    "lorascope.cli.train",
)

_MARK = "MODULES:"


def _modules_after(args: list[str], cwd=None) -> tuple[set[str], str]:
    """Run ``lorascope ARGS`` in a fresh interpreter; the modules imported by its end, and its
    stdout."""
    code = (
        "import json, sys\n"
        "from lorascope.cli.main import main\n"
        "try:\n"
        f"    main({args!r}, prog_name='lorascope')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print({_MARK!r} + json.dumps(sorted(sys.modules)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=False
    )
    assert res.returncode == 0, res.stderr
    out, _, listed = res.stdout.rpartition(_MARK)
    return set(json.loads(listed)), out


def _unwanted(modules: set[str]) -> list[str]:
    return sorted(
        m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_FOR_AMPLIFY)
    )


def test_amplify_help_imports_only_what_amplify_uses():
    modules, out = _modules_after(["amplify", "--help"])
    assert "Usage: lorascope amplify" in out
    assert "lorascope.cli.analyze" in modules  # the command was really resolved
    assert _unwanted(modules) == []


def test_amplify_run_imports_only_what_amplify_uses(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(40, 30, generator=g), tmp_path / "w.pt")
    A, B = torch.randn(4, 30, generator=g), torch.randn(40, 4, generator=g)
    torch.save({"lora_A": A, "lora_B": B}, tmp_path / "adapter.pt")
    args = ["amplify", "--base", "w.pt", "--delta", "adapter.pt", "--json"]
    modules, out = _modules_after(args, cwd=tmp_path)
    (obj,) = json.loads(out)
    assert obj["rank"] == 4
    assert _unwanted(modules) == []  # --json: not even rich


def test_every_command_resolves_under_its_name():
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)  # `lorascope --help` lists by name
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert main.get_command(ctx, "no-such-command") is None
