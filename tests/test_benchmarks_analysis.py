"""The analysis benchmark's writer keeps every other section of BENCHMARKS.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks.__main__ import END, START, parse_args, write_section


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    training = "<!-- training:start -->\nsteps\n<!-- training:end -->"
    path.write_text(f"# Benchmarks\n\n{training}\n")
    write_section(path, "first")
    write_section(path, "second")
    text = path.read_text()
    assert training in text and text.count(START) == 1 and text.count(END) == 1
    assert "second" in text and "first" not in text
    assert text.index(training) < text.index(START)


def test_options():
    args = parse_args(["--quick", "--device", "cuda", "--repeats", "3"])
    assert args.quick and args.device == "cuda" and args.repeats == 3
